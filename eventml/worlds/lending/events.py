"""Events in flight and out: the chunk (one array per column, a row per event) that every part
of the daily step emits, the schedule that holds chunks until their day, and the day's frame in
the pack's schema that the chunks become.

Kept apart from the behaviour: the step decides what happens, this module how it becomes rows
(the columns and their nulls, ids and timestamps, codes decoded to category names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from eventml.worlds.lending.config import (
    AGE_BANDS,
    CHANNELS,
    DAY_US,
    EVENT_TYPES,
    INCOME_BANDS,
    MERCHANTS,
    PACK,
    POLICY_DECISIONS,
    PROFILE_FIELDS,
    REGIONS,
    SIGNUP,
)

if TYPE_CHECKING:
    from eventml.worlds.lending.population import _Population


# Columns of an event chunk (one array per column) and what a chunk leaves out: -1 / NaN = null.
_CHUNK_FILL = {
    "amount": np.nan,
    "channel": -1,
    "device": -1,
    "merchant": -1,
    "policy": -1,
    "profile": -1,
    "term": np.nan,
    "days_late": np.nan,
    "p_default": np.nan,
    "p_fraud": np.nan,
}


def _chunk(
    user: np.ndarray, etype: int, tod: np.ndarray, **cols: np.ndarray
) -> dict[str, np.ndarray]:
    return {"user": user, "etype": np.full(user.size, etype, np.int8), "tod": tod, **cols}


def _schedule(
    store: dict[int, list[dict]],
    days: np.ndarray,
    chunk: dict[str, np.ndarray],
    horizon: int | None = None,
) -> None:
    """File the rows of `chunk` under their `days`; those on or after `horizon` are dropped."""
    order = np.argsort(days, kind="stable")
    days = days[order]
    keep = days < (horizon if horizon is not None else np.iinfo(np.int64).max)
    days, order = days[keep], order[keep]
    if not days.size:
        return
    uniq, starts = np.unique(days, return_index=True)
    for day, rows in zip(uniq.tolist(), np.split(order, starts[1:]), strict=True):
        store.setdefault(day, []).append({k: v[rows] for k, v in chunk.items()})


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Chunks with the same columns as one chunk; None when there are none."""
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else None


def _entity_ids(user: np.ndarray) -> pl.Series:
    return pl.select("u" + pl.lit(pl.Series(user)).cast(pl.String).str.zfill(7)).to_series()


def _nullable(codes: np.ndarray) -> pl.Series:
    """An integer Series in which negative codes are null."""
    idx = pl.Series(codes.astype(np.int64))
    return pl.select(pl.when(idx >= 0).then(idx)).to_series()


def _decode(names: tuple[str, ...], codes: np.ndarray) -> pl.Series:
    """Category names for integer codes; -1 is null."""
    return pl.Series(names, dtype=pl.String).gather(_nullable(codes))


def _day_columns(chunks: list[dict]) -> dict[str, np.ndarray]:
    """The day's chunks merged into one set of columns, in time order."""
    cols = {}
    for name in ("user", "etype", "tod", *_CHUNK_FILL):
        fill = _CHUNK_FILL.get(name)
        cols[name] = np.concatenate(
            [c[name] if name in c else np.full(c["user"].size, fill) for c in chunks]
        )
    order = np.lexsort((np.arange(cols["tod"].size), cols["tod"]))
    return {k: v[order] for k, v in cols.items()}


def _day_frame(
    day: int, cols: dict[str, np.ndarray], pop: _Population, start_us: int
) -> pl.DataFrame:
    """The day's columns (`_day_columns`) as one frame in `PACK`'s schema."""
    user = cols["user"]
    signup = cols["etype"] == SIGNUP
    static = {
        name: np.where(signup, codes[user], -1)
        for name, codes in (
            ("region", pop.region),
            ("age_band", pop.age_band),
            ("income_band", pop.income_band),
        )
    }
    ts = pl.Series(start_us + day * DAY_US + cols["tod"]).cast(pl.Datetime("us"))
    event_no = pl.int_range(user.size)  # ids follow time order: sorting by ts sorts by id too
    frame = pl.DataFrame(
        {
            "entity_id": _entity_ids(user),
            "event_id": pl.select(
                f"e{day:04d}-" + event_no.cast(pl.String).str.zfill(7)
            ).to_series(),
            "ts": ts.dt.replace_time_zone("UTC"),
            "event_type": _decode(EVENT_TYPES, cols["etype"]),
            "amount": pl.Series(cols["amount"], nan_to_null=True),
            "channel": _decode(CHANNELS, cols["channel"]),
            "device_id": pl.select(
                "d" + pl.lit(_nullable(cols["device"])).cast(pl.String).str.zfill(10)
            ).to_series(),
            "merchant_category": _decode(MERCHANTS, cols["merchant"]),
            "policy_decision": _decode(POLICY_DECISIONS, cols["policy"]),
            "profile_field": _decode(PROFILE_FIELDS, cols["profile"]),
            "region": _decode(REGIONS, static["region"]),
            "age_band": _decode(AGE_BANDS, static["age_band"]),
            "income_band": _decode(INCOME_BANDS, static["income_band"]),
            **{
                c: pl.Series(cols[k], nan_to_null=True)
                for c, k in (
                    ("term_months", "term"),
                    ("days_late", "days_late"),
                    ("true_p_default", "p_default"),
                    ("true_p_fraud", "p_fraud"),
                )
            },
        }
    )
    return frame.cast(PACK.event_schema())
