"""The scorer: one XGBoost model per task on named features, with reason codes a lender can give.

A `Scorer` holds a booster per task over one ordered feature list. Reason codes come from
XGBoost's own SHAP contributions (`pred_contribs`): per decision, the features pushing the risk
up the most, grouped by the human-readable reason declared for each feature (so 64 embedding
dimensions become one "recent activity pattern" reason, not 64). Saved as UBJ + JSON, never
pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import xgboost as xgb


@dataclass(frozen=True)
class ScorerConfig:
    n_estimators: int = 800
    learning_rate: float = 0.05
    max_depth: int = 5
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    early_stopping_rounds: int = 50
    # feature name -> +1 (risk never falls as it rises) or -1; features absent here are free.
    monotone: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    n_threads: int = 2

    def params(self, feature_names: list[str]) -> dict:
        unknown = set(self.monotone) - set(feature_names)
        if unknown:
            raise ValueError(f"monotone constraints name unknown features {sorted(unknown)}")
        return {
            "objective": "binary:logistic",
            "eval_metric": ["logloss", "auc"],
            "tree_method": "hist",
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "reg_lambda": self.reg_lambda,
            "seed": self.seed,
            "nthread": self.n_threads,
            "monotone_constraints": "(" + ",".join(str(self.monotone.get(f, 0)) for f in feature_names) + ")",
        }


def to_matrix(frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray:
    """Features as float32 in the scorer's order; nulls become NaN, which XGBoost treats as missing."""
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(f"scoring frame lacks features {missing[:5]}{'…' if len(missing) > 5 else ''}")
    return frame.select(pl.col(c).cast(pl.Float32) for c in feature_names).to_numpy()


@dataclass
class Scorer:
    feature_names: list[str]
    boosters: dict[str, xgb.Booster]
    config: ScorerConfig = field(default_factory=ScorerConfig)

    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        valid: pl.DataFrame,
        feature_names: list[str],
        tasks: list[str],
        config: ScorerConfig = ScorerConfig(),
        log=print,
    ) -> Scorer:
        """One booster per task, early-stopped on `valid`. Rows whose label is null (unmatured or
        not applicable to this task) are left out of that task only."""
        params = config.params(feature_names)
        boosters = {}
        for task in tasks:
            tr, va = train.filter(pl.col(task).is_not_null()), valid.filter(pl.col(task).is_not_null())
            dtrain = xgb.DMatrix(to_matrix(tr, feature_names), label=tr[task].to_numpy(), feature_names=feature_names)
            dvalid = xgb.DMatrix(to_matrix(va, feature_names), label=va[task].to_numpy(), feature_names=feature_names)
            booster = xgb.train(
                params,
                dtrain,
                num_boost_round=config.n_estimators,
                evals=[(dvalid, "valid")],
                early_stopping_rounds=config.early_stopping_rounds,
                verbose_eval=False,
            )
            # Keep only the trees up to the best round, so predict() needs no iteration_range.
            boosters[task] = booster[: booster.best_iteration + 1]
            log(f"{task}: {booster.best_iteration + 1} trees, valid AUC {booster.best_score:.4f} on {va.height:,} rows")
        return cls(feature_names=list(feature_names), boosters=boosters, config=config)

    @property
    def tasks(self) -> list[str]:
        return list(self.boosters)

    def _dmatrix(self, frame: pl.DataFrame) -> xgb.DMatrix:
        return xgb.DMatrix(to_matrix(frame, self.feature_names), feature_names=self.feature_names)

    def predict(self, frame: pl.DataFrame) -> dict[str, np.ndarray]:
        data = self._dmatrix(frame)
        return {task: b.predict(data) for task, b in self.boosters.items()}

    def margins(self, frame: pl.DataFrame, task: str) -> np.ndarray:
        return self.boosters[task].predict(self._dmatrix(frame), output_margin=True)

    def contributions(self, frame: pl.DataFrame, task: str) -> np.ndarray:
        """SHAP values in margin space, (n, features + 1); the last column is the base value."""
        return self.boosters[task].predict(self._dmatrix(frame), pred_contribs=True)

    def reasons(
        self, frame: pl.DataFrame, task: str, reason_of: dict[str, str], top: int = 4
    ) -> list[list[dict]]:
        """Per row, up to `top` reasons pushing `task` risk up, largest first, each with its summed
        contribution. Every feature must have a declared reason."""
        undeclared = [f for f in self.feature_names if f not in reason_of]
        if undeclared:
            raise ValueError(f"no reason declared for features {undeclared[:5]}")
        reasons = sorted(set(reason_of[f] for f in self.feature_names))
        column_of = {r: i for i, r in enumerate(reasons)}
        # (features, reasons) 0/1 matrix: summing contributions per reason is one matmul.
        group = np.zeros((len(self.feature_names), len(reasons)), dtype=np.float32)
        for i, f in enumerate(self.feature_names):
            group[i, column_of[reason_of[f]]] = 1.0
        per_reason = self.contributions(frame, task)[:, :-1] @ group
        order = np.argsort(-per_reason, axis=1)[:, :top]
        return [
            [
                {"reason": reasons[j], "contribution": float(per_reason[i, j])}
                for j in order[i]
                if per_reason[i, j] > 0
            ]
            for i in range(per_reason.shape[0])
        ]

    # ------------------------------------------------------------ persistence (no pickle)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for task, booster in self.boosters.items():
            booster.save_model(directory / f"{task}.ubj")
        meta = {"feature_names": self.feature_names, "tasks": self.tasks, "config": asdict(self.config)}
        (directory / "scorer.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Scorer:
        directory = Path(directory)
        meta = json.loads((directory / "scorer.json").read_text())
        boosters = {}
        for task in meta["tasks"]:
            booster = xgb.Booster()
            booster.load_model(directory / f"{task}.ubj")
            boosters[task] = booster
        return cls(feature_names=meta["feature_names"], boosters=boosters, config=ScorerConfig(**meta["config"]))
