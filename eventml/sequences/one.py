"""The request path: one entity's history as arrays, exactly as `build_sequences` builds them for
the same decision, in plain numpy (a history is a few hundred rows at most, where a Polars sort
and join cost milliseconds of per-call overhead). Only the kept events are coded, with the
helpers the batch path uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from eventml.sequences.coding import (
    EPOCH,
    SequenceSpec,
    check_event_types,
    clock_inputs,
    code_first_seen,
    floats,
    numeric_inputs,
    time_inputs,
    utc_us,
)


def build_one(
    history: pl.DataFrame, decision_ts: datetime, spec: SequenceSpec, max_len: int = 128
) -> dict[str, np.ndarray]:
    """One decision's arrays with a leading batch dimension of 1, from its entity's history (any
    events, any order; those at or after the decision are ignored); a decision time without a
    zone is UTC."""
    K = max_len
    if decision_ts.tzinfo is None:
        decision_ts = decision_ts.replace(tzinfo=UTC)
    decision_us = (decision_ts - EPOCH) // timedelta(microseconds=1)
    types = history["event_type"].to_list()
    check_event_types(set(types), spec)  # every row, as the batch path checks
    ts = utc_us(history["ts"]).dt.epoch("us").to_numpy()

    # The last K events strictly before the decision in (ts, event_id) order, nulls first as
    # Polars sorts them (lexsort: the last key is the primary one).
    prior = np.flatnonzero(ts < decision_us)
    event_id = history["event_id"].to_numpy()[prior]
    no_id = np.array([v is None for v in event_id], dtype=bool)
    event_id[no_id] = ""
    rows = prior[np.lexsort((event_id, ~no_id, ts[prior]))][max(len(prior) - K, 0) :]
    n = len(rows)

    # Slots as the batch gather fills them: right-aligned, padding (all zeros) on the left.
    real = slice(K - n, K)
    mask = np.zeros((1, K), bool)
    mask[0, real] = True
    type_index = {t: i + 1 for i, t in enumerate(spec.event_types)}
    event_type = np.zeros((1, K), np.int32)
    event_type[0, real] = [type_index[types[i]] for i in rows]
    cats = np.zeros((1, K, len(spec.categorical)), np.int32)
    first_seen = [c for c in spec.categorical if c.first_seen]
    keys = np.zeros((1, K, len(first_seen)), np.uint64)
    for j, c in enumerate(spec.categorical):
        if not c.first_seen:
            cats[0, real, j] = c.ids_of(history[c.name].to_numpy()[rows].tolist())
    for j, c in enumerate(first_seen):
        keys[0, real, j] = c.keys_of(history[c.name].to_numpy()[rows].tolist())
    code_first_seen(cats, keys, spec)
    raw = np.stack([floats(history[c])[rows] for c in ("amount", *spec.numeric)], axis=1)
    nums = np.zeros((1, K, 2 * raw.shape[1]), np.float32)
    nums[0, real] = numeric_inputs(raw)
    slot_ts = np.zeros((1, K), np.int64)
    slot_ts[0, real] = ts[rows]
    clock = np.zeros((1, K, 4), np.float32)
    clock[0, real] = clock_inputs(ts[rows])
    time = time_inputs(slot_ts, mask, np.array([decision_us]), clock)
    return {"event_type": event_type, "cats": cats, "nums": nums, "time": time, "mask": mask}
