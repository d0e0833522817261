"""The sequence model: the encoder together with the coding that turns events into its inputs.

`eventml.encoder` is torch-only (it trains on a GPU box without Polars); this module binds it to
the event table: it trains on what `eventml.encoder_data` says it learns from, codes every
decision's history for inference, and saves a trained model next to its `SequenceSpec` so
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
    embed,
    embed_and_predict,
    predict,
    save,
    train,
)
from eventml.encoder_data import EncoderData, EventTable, scan_of
from eventml.features.sharded import entity_shards
from eventml.schema import DatasetSpec
from eventml.sequences import SequenceSpec, build_one, build_sequences

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
    encoder: Encoder
    sequence_spec: SequenceSpec

    @property
    def max_len(self) -> int:
        return self.encoder.config.max_len

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.encoder.config.tasks)

    def arrays(
        self, events: pl.DataFrame, decisions: pl.DataFrame, labels: tuple[str, ...] = ()
    ) -> dict:
        return build_sequences(
            events, decisions, self.sequence_spec, self.max_len, label_columns=labels
        )

    def embed(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return embed(self.encoder, arrays)

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict(self.encoder, arrays)

    @property
    def output_names(self) -> list[str]:
        """The columns `output_columns` gives: `emb_0` … `emb_{d-1}`, then `encoder_<task>`."""
        emb = [f"emb_{i}" for i in range(self.encoder.config.emb_dim)]
        return emb + [f"encoder_{task}" for task in self.tasks]

    def output_columns(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the scorers can read from the encoder, by column, from one forward pass: the
        embedding (float32) and its own probability per task (float64)."""
        emb, probs = embed_and_predict(self.encoder, arrays)
        values = [*emb.T, *(probs[task].astype(np.float64) for task in self.tasks)]
        return dict(zip(self.output_names, values, strict=True))

    def arrays_for_one(self, history: pl.DataFrame, decision_ts) -> dict[str, np.ndarray]:
        return build_one(history, decision_ts, self.sequence_spec, self.max_len)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        save(self.encoder, directory / "encoder")
        (directory / "sequence_spec.json").write_text(self.sequence_spec.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SequenceModel:
        directory = Path(directory)
        encoder = Encoder.load(directory / "encoder")
        encoder.eval()
        spec = SequenceSpec.from_json((directory / "sequence_spec.json").read_text())
        coded = tuple(c.cardinality for c in spec.categorical)
        if coded != tuple(encoder.config.cat_cardinalities):
            raise ValueError(
                f"{directory}: the sequence spec codes categoricals into {coded} ids but the "
                f"encoder was built for {tuple(encoder.config.cat_cardinalities)}; the spec and "
                "the encoder come from different trainings (or a different eventml version)"
            )
        return cls(encoder=encoder, sequence_spec=spec)


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
) -> tuple[SequenceModel, TrainResult]:
    """Train on `eventml.encoder_data.learning_rows`; early-stop on `valid`. `events` are the
    events themselves, or the table they are read from (a cluster's workers read only their
    entities' events). `trainer` builds the sequences and runs the training loop: in this
    process (`train_in_process`), or on a cluster's workers (`eventml.cluster`)."""
    tasks = tuple(label.name for label in spec.labels)
    seq_spec = SequenceSpec.fit(spec, scan_of(events), high_cardinality=config.high_cardinality)
    data = EncoderData.of(events, splits, spec, seq_spec, config.outlook_days, config.max_len)
    log(data.summary())
    # The initial weights come from torch's global generator: seeded here, the same data and
    # config give the same model in every process (unseeded, two runs differed by 0.2 in
    # validation AUC and 0.04 in the embedding lift).
    torch.manual_seed(config.seed)
    # The model's shape and the training loop's settings are this config's fields of the same
    # names; only what the data decides (input sizes, tasks, outlook targets) is added here.
    encoder = Encoder(
        EncoderConfig(
            **seq_spec.encoder_dims(),
            **_fields_of(config, EncoderConfig),
            tasks=tasks,
            task_weights=(1.0,) * len(tasks),  # every label of the pack counts alike
            outlook=data.outlook,
        )
    )
    result = trainer(
        encoder, data, TrainConfig(**_fields_of(config, TrainConfig), monitor="auc"), log=log
    )
    encoder.eval()
    return SequenceModel(encoder=encoder, sequence_spec=seq_spec), result


def embedding_table(
    model: SequenceModel, events: pl.DataFrame, decisions: pl.DataFrame
) -> pl.DataFrame:
    """decision_id, the embedding (emb_0 … emb_{d-1}) and the encoder's own probability per task
    (`encoder_<task>`), for every decision, in the decisions' order.

    Coded a part of whole entities at a time: every output depends on its entity's own events
    only, and the sequence arrays of every decision at once would not fit (2.3M decisions took
    over 24 GB; bench/scale.py)."""
    decisions = decisions.select("decision_id", "entity_id", "ts")
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


def _outputs(model: SequenceModel, events: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    columns = model.output_columns(model.arrays(events, decisions))
    return pl.DataFrame({"decision_id": decisions["decision_id"], **columns})


def _fields_of(config: SequenceModelConfig, target: type) -> dict:
    """The settings of `config` that the dataclass `target` also has, by name."""
    names = {f.name for f in fields(target)}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name in names}


def config_dict(config: SequenceModelConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
