"""The sequence encoder, nanoGPT-style: the model (`model`), the batches that feed it
(`batches`), its training loop (`train`) and inference (`infer`).

Imports only torch, numpy and the standard library, so it trains on a GPU box that has neither
polars nor dagster; `eventml.embedding` binds it to the event tables.
"""

from eventml.encoder.batches import iter_batches, iter_part_batches, to_tensors
from eventml.encoder.infer import embed, embed_and_predict, predict
from eventml.encoder.model import Encoder, EncoderConfig, masked_bce, save
from eventml.encoder.train import (
    TrainConfig,
    TrainResult,
    evaluate,
    make_train_step,
    roc_auc,
    train,
)

__all__ = [
    "Encoder",
    "EncoderConfig",
    "TrainConfig",
    "TrainResult",
    "embed",
    "embed_and_predict",
    "evaluate",
    "iter_batches",
    "iter_part_batches",
    "make_train_step",
    "masked_bce",
    "predict",
    "roc_auc",
    "save",
    "to_tensors",
    "train",
]
