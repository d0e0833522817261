"""The risk model: what is registered, promoted and served as one unit.

A sequence model (an encoder per fold of people + event coding), an XGBoost scorer on
point-in-time features plus the encoders' probability per task, the feature set both were
trained with, and the thresholds that turn probabilities into a decision. `score_tables` scores
decisions from the offline tables; `score` scores live decisions from their entities' events
with the functions training uses, and `score_one` one decision through the request path, which
agrees with them to the bit. The Bento runs the last two; the parity check compares them with
the first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from eventml.embedding import SequenceModel, embedding_table
from eventml.features import FeatureSet, compute_features, features_for_one
from eventml.scorer import Scorer, to_matrix

EMBEDDING_REASON = "recent activity pattern"


@dataclass(frozen=True)
class DecisionPolicy:
    """Decline when any task's probability reaches its threshold; otherwise approve. The
    thresholds are the dataset pack's `policy`: one per label, so no task goes unjudged."""

    thresholds: dict[str, float]

    def decide(self, probabilities: dict[str, float]) -> str:
        hit = any(probabilities[task] >= t for task, t in self.thresholds.items())
        return "decline" if hit else "approve"


@dataclass
class RiskModel:
    sequence_model: SequenceModel
    scorer: Scorer
    feature_set: FeatureSet
    policy: DecisionPolicy

    @property
    def tasks(self) -> list[str]:
        return self.scorer.tasks

    @property
    def reason_of(self) -> dict[str, str]:
        """Every scorer input's reason: the feature set's texts, and one shared text for
        everything read from the encoders (their probabilities and embeddings)."""
        reasons = dict(self.feature_set.reasons())
        from_encoder = set(self.sequence_model.output_names)
        reasons.update(
            {c: EMBEDDING_REASON for c in self.scorer.feature_names if c in from_encoder}
        )
        return reasons

    # ------------------------------------------------------------ offline

    def score_tables(self, features: pl.DataFrame, embeddings: pl.DataFrame) -> pl.DataFrame:
        """decision_id and `p_<task>` for decisions whose features and embeddings are given."""
        return self.scorer.probability_table(
            features.join(embeddings, on="decision_id", how="inner")
        )

    def scores_on(
        self, table: pl.DataFrame, events: pl.DataFrame, decisions: pl.DataFrame
    ) -> dict[str, np.ndarray]:
        """Probabilities for the rows of a model table (features, labels, and maybe another
        model's encoder columns), with this model's own encoder columns in their place: a
        champion is judged with its own encoder on the challenger's test rows, row for row."""
        embeddings = self.embed_decisions(events, decisions)
        own = [c for c in embeddings.columns if c != "decision_id"]
        scored = table.drop(own, strict=False).join(
            embeddings, on="decision_id", how="left", maintain_order="left"
        )
        return self.scorer.predict(scored)

    def embed_decisions(self, events: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
        """This model's own encoder columns (embedding and probabilities) of each decision: a
        champion is scored with its own encoder."""
        return embedding_table(self.sequence_model, events, decisions)

    # ------------------------------------------------------------ live decisions

    def score(
        self,
        events: pl.DataFrame,
        decisions: pl.DataFrame,
        activity: pl.DataFrame | None = None,
        top_reasons: int = 4,
    ) -> list[dict]:
        """Probabilities, decision and reasons per decision (in order), from the entities'
        events strictly before each: the batch functions training uses (`compute_features`,
        the sequence arrays, one encoder pass, one scorer pass) for many decisions at once."""
        features = compute_features(events, decisions, self.feature_set, activity)
        model = self.sequence_model
        folds = model.folds_of_decisions(decisions)
        encoded = model.output_columns(model.arrays(events, decisions), folds)
        table = decisions.select("decision_id").join(
            features, on="decision_id", how="left", maintain_order="left"
        )
        table = table.with_columns(pl.Series(c, v) for c, v in encoded.items())
        return self._judged(to_matrix(table, self.scorer.feature_names), top_reasons)

    def score_one(
        self,
        history: pl.DataFrame,
        decision: dict,
        activity: pl.DataFrame | None = None,
        top_reasons: int = 4,
    ) -> dict:
        """`score` of one decision, through the request path (`features_for_one`, the sequence of
        one history), which agrees with the batch functions to the bit at a fraction of their
        fixed cost. Later rows in `history` are ignored; keyed features read `activity`."""
        features = features_for_one(history, decision, self.feature_set, activity)
        arrays = self.sequence_model.arrays_for_one(history, decision["ts"])
        folds = self.sequence_model.folds_of([decision["entity_id"]])
        with torch.inference_mode():  # no autograd bookkeeping at all (no_grad still keeps some)
            encoded = self.sequence_model.output_columns(arrays, folds)
        row = {**features, **{c: v[0] for c, v in encoded.items()}}
        # The scorer's float32 matrix, built directly: the same values `to_matrix` gives a
        # one-row DataFrame (None is NaN, missing to XGBoost), without its per-column cost.
        x = np.array(
            [[np.nan if row[c] is None else row[c] for c in self.scorer.feature_names]],
            dtype=np.float32,
        )
        return self._judged(x, top_reasons)[0]

    def _judged(self, matrix: np.ndarray, top_reasons: int) -> list[dict]:
        """The one end of every live path: each booster's probabilities and SHAP values from one
        matrix (`score_rows`), the policy's decision and the top reasons."""
        probabilities, contributions = self.scorer.score_rows(matrix)
        reason_of = self.reason_of
        reasons = {
            task: self.scorer.top_reasons(c, reason_of, top_reasons)
            for task, c in contributions.items()
        }
        probs = {task: p.tolist() for task, p in probabilities.items()}
        out = []
        for i in range(len(matrix)):
            p = {task: probs[task][i] for task in self.tasks}
            out.append({
                "probabilities": p,
                "decision": self.policy.decide(p),
                "reasons": {task: reasons[task][i] for task in self.tasks},
            })  # fmt: skip
        return out

    # ------------------------------------------------------------ persistence (no pickle)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.sequence_model.save(directory / "sequence_model")
        self.scorer.save(directory / "scorer")
        (directory / "feature_set.json").write_text(self.feature_set.to_json())
        (directory / "policy.json").write_text(json.dumps(asdict(self.policy)))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RiskModel:
        directory = Path(directory)
        return cls(
            sequence_model=SequenceModel.load(directory / "sequence_model"),
            scorer=Scorer.load(directory / "scorer"),
            feature_set=FeatureSet.from_json((directory / "feature_set.json").read_text()),
            policy=DecisionPolicy(**json.loads((directory / "policy.json").read_text())),
        )


def model_table(
    splits: pl.DataFrame,
    features: pl.DataFrame | pl.LazyFrame,
    embeddings: pl.DataFrame | pl.LazyFrame | None = None,
) -> pl.DataFrame:
    """The decisions of `splits`, with their split, labels and oracle columns, joined to their
    features (and embeddings): the rows every scorer trains and is evaluated on. Features and
    embeddings may be scans of their tables: only `splits`' rows are read from them, so a step
    that needs some of the rows (a scorer's training rows, the test window) never holds every
    decision's."""
    ids = splits["decision_id"].implode()

    def rows_of(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        if isinstance(frame, pl.DataFrame):  # the join keeps the splits' rows alone
            return frame
        return frame.filter(pl.col("decision_id").is_in(ids)).collect()

    # XGBoost's row sampling depends on the rows' order: a canonical one (the splits' sorted, kept
    # by the joins) makes every training run on the same data the same model.
    table = splits.sort("ts", "decision_id").join(
        rows_of(features).drop("entity_id", "ts", "day", strict=False),
        on="decision_id",
        how="inner",
        maintain_order="left",
    )
    if embeddings is not None:
        table = table.join(
            rows_of(embeddings), on="decision_id", how="inner", maintain_order="left"
        )
    return table
