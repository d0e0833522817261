"""The card world's events while it steps: chunks of columns of integer codes (one per event),
and their decoding into the pack's names when a day becomes a frame."""

from __future__ import annotations

import numpy as np
import polars as pl

COLUMNS = {"card": -1, "ts": 0, "etype": -1, "amount": np.nan, "channel": -1, "mcc": -1,
           "merchant": -1, "terminal": -1, "field": -1, "fraud": np.nan, "p": np.nan}  # fmt: skip


def _chunk(n: int, **cols) -> dict[str, np.ndarray]:
    """`n` events; columns not given take their 'none' value (-1 codes, NaN numbers)."""
    out = {}
    for name, none in COLUMNS.items():
        value = cols.get(name, none)
        dtype = np.float64 if isinstance(none, float) else np.int64
        out[name] = np.broadcast_to(np.asarray(value, dtype=dtype), (n,)).copy()
    return out


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    chunks = [c for c in chunks if c["card"].size] or [_chunk(0)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in COLUMNS}


def _decode(names: tuple[str, ...], codes: np.ndarray) -> pl.Series:
    """Category names for integer codes; -1 is null."""
    idx = pl.Series(codes.astype(np.int64))
    return pl.Series(names, dtype=pl.String).gather(
        pl.select(pl.when(idx >= 0).then(idx)).to_series()
    )


def _ids(prefix: str, codes: np.ndarray, width: int = 5) -> pl.Series:
    """Ids like m00042 for codes; -1 is null."""
    s = pl.Series(codes.astype(np.int64))
    return pl.select(
        pl.when(s >= 0).then(pl.lit(prefix) + s.cast(pl.String).str.zfill(width))
    ).to_series()
