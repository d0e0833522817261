"""Batches of encoder inputs: numpy arrays to tensors, and the iterator that feeds training and
inference (optionally bucketed by length, so short histories do not pay for padding)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from eventml.encoder.model import BATCH_KEYS, ROW_KEYS

# ----------------------------------------------------------------------------- batching


def to_tensors(
    arrays: dict[str, np.ndarray], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The batch keys of built arrays as tensors, zero-copy on CPU; moved to `device` once, up
    front, so a GPU's batches are slices in its own memory and no copy sits in the step."""
    return {k: torch.as_tensor(v).to(device) for k, v in arrays.items() if k in BATCH_KEYS}


def iter_batches(
    data: dict[str, np.ndarray | torch.Tensor],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    bucket: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches in the encoder's format from arrays (numpy or tensors, any device).

    Rows are gathered where the data lives; batches of CPU data bound for a GPU go through
    pinned memory with a non-blocking copy. Ids are widened to int64 here, so stored arrays may
    keep compact int32. The same seed gives the same batches.

    `bucket` groups rows of similar history length (sorted within windows of 8 batches, the
    batches then shuffled) and cuts each batch to its longest history, rounded up to a multiple
    of 16. The columns cut hold only padding, which never changes an output (the model reads
    positions from the right), so this saves the compute spent on padding and nothing else.
    """
    tensors = {k: torch.as_tensor(v) for k, v in data.items() if k in BATCH_KEYS}
    n, K = tensors["mask"].shape
    source = tensors["mask"].device
    device = torch.device(device) if device is not None else source
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    lengths = torch.as_tensor(data["mask"]).sum(1).cpu() if bucket else None  # one sync an epoch
    if bucket:
        # Wider windows buy little: with uniform lengths a batch's width is its band's top,
        # on average (w+1)/2w of K for windows of w batches, and mixing matters more.
        windows = order.split(8 * batch_size)
        order = torch.cat([w[torch.argsort(lengths[w], stable=True)] for w in windows])
    batches = [rows for rows in order.split(batch_size) if len(rows)]  # no rows, no batch
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    if bucket and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    if source.type == "cuda":
        # The indices go over once, pinned: a pageable copy would stall the stream.
        order_src = torch.cat(batches).pin_memory().to(source, non_blocking=True)
        batches_src = order_src.split([len(b) for b in batches])
    else:
        batches_src = batches

    for rows, rows_src in zip(batches, batches_src, strict=True):
        width = K
        if bucket:
            width = min(K, max(16, -(-int(lengths[rows].max()) // 16) * 16))
        batch = {}
        for k, t in tensors.items():
            if k not in ROW_KEYS:
                t = t[:, K - width :]  # a view: only the kept columns are gathered
            t = t[rows_src]
            if k in ("event_type", "cats"):
                t = t.long()
            if t.device != device:
                if device.type == "cuda" and t.device.type == "cpu":
                    t = t.pin_memory()
                t = t.to(device, non_blocking=True)
            batch[k] = t
        yield batch


def batches_in(rows: int, batch_size: int) -> int:
    """How many training batches `iter_batches` cuts from `rows` rows (the last short one
    dropped, unless it is the only one)."""
    return rows // batch_size if rows >= batch_size else min(rows, 1)


def iter_part_batches(
    parts: list[dict[str, np.ndarray | torch.Tensor]],
    batch_size: int,
    *,
    seed: int,
    steps: int | None = None,
    bucket: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An epoch's training batches over several parts of the rows, which stay where they are
    (a cluster worker's shards, in its object store): each part's own shuffled batches as
    `iter_batches` cuts them, the parts' batches taken in a random order; the first `steps` of
    them (a data-parallel group's replicas must each take the same number). One part gives
    exactly `iter_batches(part, shuffle=True, drop_last=True)`'s batches."""
    part_batches = [
        iter_batches(part, batch_size, shuffle=True, seed=seed + 7919 * i, drop_last=True,
                     bucket=bucket, device=device)
        for i, part in enumerate(parts)
    ]  # fmt: skip
    turns = torch.cat(
        [
            torch.full((batches_in(len(part["mask"]), batch_size),), i)
            for i, part in enumerate(parts)
        ]
    )
    if len(parts) > 1:
        turns = turns[torch.randperm(len(turns), generator=torch.Generator().manual_seed(seed))]
    for i in turns[:steps].tolist():
        yield next(part_batches[i])
