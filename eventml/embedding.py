"""The sequence model: an encoder per fold of people, with the coding that turns events into
their inputs.

`eventml.encoder` is torch-only (it trains on a GPU box without Polars); this module binds it to
the event table: it trains each fold's encoder on what `eventml.encoder_data` says it learns
from, codes every decision's history for inference, cross-fits the encoders' outputs for the
scorers (`embedding_table`), and saves the trained encoders next to their `SequenceSpec` so
serving codes events exactly as training did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch

from eventml.encoder import (
    Encoder,
    EncoderConfig,
    TrainConfig,
    TrainResult,
    embed_and_predict,
    save,
    train,
)
from eventml.encoder_data import EncoderData, EventTable, scan_of
from eventml.features.sharded import entity_shards
from eventml.schema import DatasetSpec
from eventml.sequences import SequenceSpec, build_one, build_sequences
from eventml.splits import fold_of

# Decisions whose sequence arrays are built at once by `embedding_table`: about half a GB.
DECISIONS_PER_PASS = 50_000

# (encoder, what it learns from, config, log) -> result: builds the sequences and trains the encoder
# in place.
Trainer = Callable[..., TrainResult]


@dataclass(frozen=True)
class SequenceModelConfig:
    """Sized for a 2-core CPU: about half a minute an epoch on the default world. A GPU takes
    d_model=128, n_layers=4, max_len=256 (see bench/encoder_gpu.py)."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64
    emb_dim: int = 16
    dropout: float = 0.1
    aux_task: str = "masked_event"
    aux_weight: float = 0.5
    # Outlook targets (see `eventml.encoder_data.outlook_targets`): the window in days (0 = none)
    # and their weight.
    outlook_days: int = 30
    outlook_weight: float = 1.0
    # How identifier columns (device ids) are coded: "first_seen" (their order of appearance in
    # the history) or "hash" (a bucket per value, which lets the encoder memorise people); see
    # `eventml.sequences`.
    high_cardinality: str = "first_seen"
    # 16, not 8: once it could no longer memorise people by their devices, the encoder kept
    # improving past epoch 8 (its test AUC 0.62 -> 0.63-0.65, the lift +0.020 -> +0.037 on
    # average over seeds; bench/embedding_lift.py).
    epochs: int = 16
    batch_size: int = 256
    lr: float = 2e-3
    patience: int = 3
    # Histories of similar length batched together: short early histories cost what they are.
    bucket_by_length: bool = True
    seed: int = 0
    device: str = "cpu"


@dataclass
class SequenceModel:
    """One encoder per fold of people (`eventml.splits.with_person_folds`), all of one shape
    and coding, each taught decision labels by its fold's people only. Every decision of a
    person, in training and live, is scored by the other folds' encoders, which never learned
    that person's outcomes (`output_columns`)."""

    encoders: tuple[Encoder, ...]
    sequence_spec: SequenceSpec

    @property
    def config(self) -> EncoderConfig:
        return self.encoders[0].config

    @property
    def max_len(self) -> int:
        return self.config.max_len

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks)

    def num_params(self) -> int:
        return sum(encoder.num_params() for encoder in self.encoders)

    def arrays(
        self, events: pl.DataFrame, decisions: pl.DataFrame, labels: tuple[str, ...] = ()
    ) -> dict:
        return build_sequences(
            events, decisions, self.sequence_spec, self.max_len, label_columns=labels
        )

    @property
    def probability_names(self) -> list[str]:
        """`encoder_<task>`: the encoders' probability per task, what the risk scorer reads."""
        return [f"encoder_{task}" for task in self.tasks]

    @property
    def output_names(self) -> list[str]:
        """The columns `output_columns(..., embeddings=True)` gives: the embedding, every
        fold's side by side (`emb_0` … `emb_{folds * d - 1}`: the folds' spaces differ, so none
        is averaged), then `probability_names`."""
        width = len(self.encoders) * self.config.emb_dim
        return [f"emb_{i}" for i in range(width)] + self.probability_names

    def folds_of(self, entity_ids) -> np.ndarray:
        """Each person's fold, as `eventml.splits.with_person_folds` dealt them in training."""
        return fold_of(entity_ids, len(self.encoders))

    def folds_of_decisions(self, decisions: pl.DataFrame) -> np.ndarray:
        """Each decision's person's fold: the `fold` column where the decisions carry one (the
        training splits, or requests keyed by something other than the person), else
        `folds_of` their `entity_id`."""
        if "fold" in decisions.columns:
            return decisions["fold"].to_numpy()
        return self.folds_of(decisions["entity_id"])

    def output_columns(
        self, arrays: dict[str, np.ndarray], folds: np.ndarray, embeddings: bool = False
    ) -> dict[str, np.ndarray]:
        """What the scorers read from the encoders, by column: the probability per task
        (float64), the mean over the encoders of every fold but the row's person's (`folds`),
        which never learned that person's labels, so a person is scored by the same encoders in
        training and live; with `embeddings`, first the embedding (float32, every fold's side by
        side). Without embeddings, each encoder runs on the rows it scores only: one encoder a
        row with two folds."""
        rows, count = len(folds), len(self.encoders)
        if rows and not ((folds >= 0) & (folds < count)).all():
            raise ValueError(
                f"folds {sorted(set(folds.tolist()))} for a model with encoders for folds "
                f"0-{count - 1}: give the folds the model was trained with"
            )
        sums = {task: np.zeros(rows) for task in self.tasks}
        scored_by = np.zeros(rows)
        embedded = []
        for fold, encoder in enumerate(self.encoders):
            # A model saved before cross-fitting has one encoder, which scores every row.
            scores = folds != fold if count > 1 else np.ones(rows, dtype=bool)
            if embeddings:
                emb, probs = embed_and_predict(encoder, arrays)
                embedded.append(emb)
                probs = {task: p[scores] for task, p in probs.items()}
            elif scores.any():
                probs = embed_and_predict(encoder, {k: v[scores] for k, v in arrays.items()})[1]
            else:
                continue
            for task in self.tasks:
                sums[task][scores] += probs[task].astype(np.float64)
            scored_by[scores] += 1
        columns = {}
        if embeddings:
            width = count * self.config.emb_dim
            emb = np.concatenate(embedded, axis=1) if rows else np.zeros((0, width), np.float32)
            columns = dict(zip(self.output_names[:width], emb.T, strict=True))
        return columns | {
            name: sums[task] / scored_by
            for name, task in zip(self.probability_names, self.tasks, strict=True)
        }

    def arrays_for_one(self, history: pl.DataFrame, decision_ts) -> dict[str, np.ndarray]:
        return build_one(history, decision_ts, self.sequence_spec, self.max_len)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        for fold, encoder in enumerate(self.encoders):
            save(encoder, directory / "encoders" / str(fold))
        (directory / "sequence_spec.json").write_text(self.sequence_spec.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SequenceModel:
        directory = Path(directory)
        if (directory / "encoders").is_dir():
            folds = sorted((directory / "encoders").iterdir(), key=lambda path: int(path.name))
        else:  # saved before cross-fitting: one encoder, whose scorer reads its embedding
            folds = [directory / "encoder"]
        encoders = tuple(Encoder.load(path).eval() for path in folds)
        spec = SequenceSpec.from_json((directory / "sequence_spec.json").read_text())
        coded = tuple(c.cardinality for c in spec.categorical)
        if coded != tuple(encoders[0].config.cat_cardinalities):
            raise ValueError(
                f"{directory}: the sequence spec codes categoricals into {coded} ids but the "
                f"encoders were built for {tuple(encoders[0].config.cat_cardinalities)}; the "
                "spec and the encoders come from different trainings (or eventml versions)"
            )
        return cls(encoders=encoders, sequence_spec=spec)


def train_in_process(
    encoder: Encoder, data: EncoderData, config: TrainConfig, log=None
) -> TrainResult:
    """The training loop in this process, on every row's sequence built at once."""
    return train(encoder, *data.arrays(), config, log=log)


def train_sequence_model(
    events: pl.DataFrame | EventTable,
    splits: pl.DataFrame,
    spec: DatasetSpec,
    config: SequenceModelConfig = SequenceModelConfig(),
    log=print,
    trainer: Trainer = train_in_process,
) -> tuple[SequenceModel, list[TrainResult]]:
    """One encoder per fold of the splits' people (`fold`), each on
    `eventml.encoder_data.learning_rows` of its fold, early-stopped on `valid`; a result per
    fold. `events` are the events themselves, or the table they are read from (a cluster's
    workers read only their entities' events). `trainer` builds the sequences and runs the
    training loop: in this process (`train_in_process`), or on a cluster's workers
    (`eventml.cluster`)."""
    tasks = tuple(label.name for label in spec.labels)
    seq_spec = SequenceSpec.fit(spec, scan_of(events), high_cardinality=config.high_cardinality)
    if "fold" not in splits.columns:
        raise ValueError(
            "the splits have no `fold` column: deal their people into folds with "
            "`eventml.splits.with_person_folds` (an encoder per fold, so that no scorer learns "
            "from the outputs of an encoder that learned the same person's labels)"
        )
    folds = splits["fold"].unique().sort().to_list()
    if folds != list(range(len(folds))):
        raise ValueError(f"the splits' folds are {folds}, not 0 … n-1: deal them again")
    encoders, results = [], []
    for fold in folds:
        data = EncoderData.of(
            events, splits, spec, seq_spec, config.outlook_days, config.max_len, fold=fold
        )
        log(f"fold {fold}: {data.summary()}")
        # The initial weights come from torch's global generator: seeded here, the same data
        # and config give the same model in every process (unseeded, two runs differed by 0.2
        # in validation AUC and 0.04 in the embedding lift).
        torch.manual_seed(config.seed)
        # The model's shape and the training loop's settings are this config's fields of the
        # same names; only what the data decides (input sizes, tasks, outlook targets) is added.
        encoder = Encoder(
            EncoderConfig(
                **seq_spec.encoder_dims(),
                **_fields_of(config, EncoderConfig),
                tasks=tasks,
                task_weights=(1.0,) * len(tasks),  # every label of the pack counts alike
                outlook=data.outlook,
            )
        )
        train_config = TrainConfig(**_fields_of(config, TrainConfig), monitor="auc")
        results.append(trainer(encoder, data, train_config, log=log))
        encoders.append(encoder.eval())
    return SequenceModel(encoders=tuple(encoders), sequence_spec=seq_spec), results


def embedding_table(
    model: SequenceModel, events: pl.DataFrame, decisions: pl.DataFrame
) -> pl.DataFrame:
    """decision_id and `output_columns` (embeddings included) for every decision, in the
    decisions' order, each person in their `fold` where `decisions` has one (the splits the
    model was trained on), else in the fold their id deals them
    (`SequenceModel.folds_of_decisions`).

    Coded a part of whole entities at a time: every output depends on its entity's own events
    only, and the sequence arrays of every decision at once would not fit (2.3M decisions took
    over 24 GB; bench/scale.py)."""
    decisions = decision_keys(decisions)
    parts = entity_shards(decisions, -(-decisions.height // DECISIONS_PER_PASS))
    if len(parts) == 1:
        return _outputs(model, events, decisions)
    table = pl.concat(
        _outputs(model, events.join(part.select("entity_id"), on="entity_id", how="semi"), part)
        for part in parts
    )
    return decisions.select("decision_id").join(
        table, on="decision_id", how="left", maintain_order="left"
    )


def decision_keys(decisions: pl.DataFrame) -> pl.DataFrame:
    """The columns of `decisions` the encoders read: the decision, its person and time, and the
    person's `fold` where the decisions carry one."""
    keep = [c for c in ("decision_id", "entity_id", "ts", "fold") if c in decisions.columns]
    return decisions.select(keep)


def _outputs(model: SequenceModel, events: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    folds = model.folds_of_decisions(decisions)
    columns = model.output_columns(model.arrays(events, decisions), folds, embeddings=True)
    return pl.DataFrame({"decision_id": decisions["decision_id"], **columns})


def _fields_of(config: SequenceModelConfig, target: type) -> dict:
    """The settings of `config` that the dataclass `target` also has, by name."""
    names = {f.name for f in fields(target)}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name in names}


def config_dict(config: SequenceModelConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
