"""The request path: a feature set's definitions applied literally to one entity's history.

The batch path (`eventml.features.batch`) must agree with this to the last bit; tests and the
`point_in_time_parity` check hold the two together, which is why this is a separate, obvious
implementation rather than the batch one called with one row.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np
import polars as pl

from eventml.features.declare import (
    KEYED_KINDS,
    STAT_KINDS,
    US_PER_DAY,
    EventFilter,
    FeatureSet,
    encode_value,
    window_us,
)
from eventml.features.keyed import keyed_features, require_activity


def _ts_us(value: datetime | int) -> int:
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return int(value)


def features_for_one(
    history: pl.DataFrame,
    decision: Mapping,
    feature_set: FeatureSet,
    activity: pl.DataFrame | None = None,
) -> dict:
    """Features for one live decision from its entity's events (any order, any extra rows:
    only rows of the decision's entity, if given, with ts strictly before it are used), and its
    keyed features from `activity` (the online store's rows of the decision's keys).

    Plain numpy on the history's columns: a request's history is a few hundred rows, where each
    Polars call's fixed cost would dominate. Masks are memoized per call, as many features share
    a window or an event filter."""
    require_activity(feature_set, activity)
    t = _ts_us(decision["ts"])
    all_ts = history["ts"].dt.epoch("us").to_numpy()
    keep = all_ts < t
    if "entity_id" in decision and "entity_id" in history.columns:
        entity = decision["entity_id"]
        # A null entity matches nothing (a comparison with null is null, as in Polars).
        keep &= False if entity is None else history["entity_id"].to_numpy() == entity
    rows = np.flatnonzero(keep)
    ts = all_ts[rows]
    if feature_set.of_kind("static"):
        # Latest values need the time order; ties go by event_id, nulls first as Polars sorts.
        keys = [ts]
        if "event_id" in history.columns:
            ids = history["event_id"].to_numpy()[rows]
            no_id = np.array([v is None for v in ids], dtype=bool)
            ids[no_id] = ""
            keys = [ids, ~no_id, ts]
        order = np.lexsort(keys)
        rows, ts = rows[order], ts[order]
    cols = {c: history[c].to_numpy()[rows] for c in ("event_type", *feature_set.event_columns())}
    cols["ts"] = ts
    # Numeric columns as floats, null as NaN: the statistics skip missing values.
    numbers = {
        c: history[c].cast(pl.Float64).to_numpy()[rows]
        for c in {f.column for f in feature_set.of_kind(*STAT_KINDS)}
    }
    windows: dict[tuple[str, int], np.ndarray] = {}
    filters: dict[EventFilter, np.ndarray] = {}

    def since(w: str, until: int = 0) -> np.ndarray:
        if (w, until) not in windows:
            wu = window_us(w)
            windows[w, until] = (ts < t - until) & (True if wu is None else ts >= t - until - wu)
        return windows[w, until]

    def matching(flt: EventFilter) -> np.ndarray:
        if flt not in filters:
            filters[flt] = flt.mask(cols)
        return filters[flt]

    def n(mask: np.ndarray) -> int:  # count_nonzero: a bool sum without the ufunc machinery
        return int(np.count_nonzero(mask))

    out: dict[str, float | int | None] = {}
    for f in feature_set.features:
        if f.kind == "count":
            out[f.name] = n(matching(f.events) & since(f.window))
        elif f.kind in STAT_KINDS:
            vals = numbers[f.column]
            vals = vals[matching(f.events) & since(f.window) & ~np.isnan(vals)]
            if f.kind == "sum":
                out[f.name] = float(vals.sum())
            elif len(vals) == 0:
                out[f.name] = None
            else:
                out[f.name] = float(vals.sum() / len(vals) if f.kind == "mean" else vals.max())
        elif f.kind == "distinct":
            vals = cols[f.column][since(f.window)]
            out[f.name] = len({v for v in vals if v is not None})
        elif f.kind == "days_since":
            m = matching(f.events)
            out[f.name] = (t - int(ts[m].max())) / US_PER_DAY if m.any() else None
        elif f.kind == "trend":
            m, w = matching(f.events), window_us(f.window)
            out[f.name] = n(m & since(f.window)) - n(m & since(f.window, until=w))
        elif f.kind == "ratio":
            inw = since(f.window)
            den = n(matching(f.denominator) & inw)
            out[f.name] = n(matching(f.events) & inw) / den if den else None
        elif f.kind == "static":
            known = [v for v in cols[f.column] if v is not None]
            out[f.name] = encode_value(known[-1], feature_set.vocab[f.column]) if known else None
        elif f.kind == "decision_value":
            v = decision.get(f.column)
            out[f.name] = None if v is None else float(v)
        elif f.kind == "decision_category":
            out[f.name] = encode_value(decision.get(f.column), feature_set.vocab[f.column])
        elif f.kind == "seen_before":
            v = decision.get(f.column)
            out[f.name] = None if v is None else n(cols[f.column] == v)
    if keys := sorted({f.column for f in feature_set.of_kind(*KEYED_KINDS)}):
        one = pl.DataFrame(
            {"decision_id": ["_"], "ts": [t], **{c: [decision.get(c)] for c in keys}},
            schema={"decision_id": pl.String, "ts": pl.Int64, **dict.fromkeys(keys, pl.String)},
        ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        out.update(
            keyed_features(activity, one, feature_set).drop("decision_id").row(0, named=True)
        )
    return out
