"""Inference with a trained encoder: embeddings and per-task probabilities, batch by batch."""

from __future__ import annotations

import numpy as np
import torch

from eventml.encoder.batches import iter_batches
from eventml.encoder.model import ROW_KEYS, Encoder

# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def outputs(model: Encoder, data, keys: tuple[str, ...], batch_size: int) -> list[torch.Tensor]:
    """Outputs of the model in eval mode, fp32, for every row, in order: one forward pass."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    unlabelled = {k: v for k, v in data.items() if k not in ROW_KEYS}
    parts = []
    for batch in iter_batches(unlabelled, batch_size, device=device):
        out = model(batch)
        parts.append([out[key].float() for key in keys])
    model.train(was_training)
    if parts:
        return [torch.cat(column) for column in zip(*parts, strict=True)]
    width = {"emb": model.config.emb_dim, "logits": len(model.config.tasks)}
    return [torch.zeros(0, width[key], device=device) for key in keys]


def embed(model: Encoder, data: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """(N, emb_dim) pooled embeddings, one per row of `data`, in order."""
    return outputs(model, data, ("emb",), batch_size)[0].cpu().numpy()


def predict(
    model: Encoder, data: dict[str, np.ndarray], batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """task name -> (N,) probabilities."""
    return embed_and_predict(model, data, batch_size)[1]


def embed_and_predict(
    model: Encoder, data: dict[str, np.ndarray], batch_size: int = 1024
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`embed` and `predict` from one forward pass."""
    emb, logits = outputs(model, data, ("emb", "logits"), batch_size)
    probs = torch.sigmoid(logits).cpu().numpy()
    return emb.cpu().numpy(), {task: probs[:, j] for j, task in enumerate(model.config.tasks)}
