"""The request path: one entity's history as arrays, exactly as `build_sequences` builds them for
the same decision, in plain numpy (a history is a few hundred rows at most, where a Polars sort
and join cost milliseconds of per-call overhead). Only the kept events are coded, with the
helpers the batch path uses."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, timedelta

import numpy as np
import polars as pl

from eventml.sequences.coding import (
    EPOCH,
    SequenceSpec,
    check_event_types,
    clock_inputs,
    code_first_seen,
    floats,
    history_slots,
    numeric_inputs,
    time_inputs,
    utc_us,
)


def build_one(
    history: pl.DataFrame, decision: Mapping, spec: SequenceSpec, max_len: int = 128
) -> dict[str, np.ndarray]:
    """One decision's arrays with a leading batch dimension of 1. `history`: the entity's events
    (any order; those at or after the decision are ignored); `decision`: its `ts`, and with a
    decision token the decision event's own fields (`SequenceSpec.decision_columns`; a missing
    attribute is null)."""
    H, K = history_slots(spec, max_len), max_len
    at = decision["ts"]
    decision_us = (at.replace(tzinfo=at.tzinfo or UTC) - EPOCH) // timedelta(microseconds=1)
    types = history["event_type"].to_list()
    check_event_types(set(types), spec)  # every row, as the batch path checks
    ts = utc_us(history["ts"]).dt.epoch("us").to_numpy()

    # The last H events strictly before the decision in (ts, event_id) order, nulls first as
    # Polars sorts them (lexsort: the last key is the primary one).
    prior = np.flatnonzero(ts < decision_us)
    event_id = history["event_id"].to_numpy()[prior]
    no_id = np.array([v is None for v in event_id], dtype=bool)
    event_id[no_id] = ""
    rows = prior[np.lexsort((event_id, ~no_id, ts[prior]))][max(len(prior) - H, 0) :]

    # The kept events' values, oldest first, then the decision's own when it has a slot.
    kept_types = [types[i] for i in rows]
    values = {c.name: history[c.name].to_numpy()[rows].tolist() for c in spec.categorical}
    raw = np.stack([floats(history[c])[rows] for c in ("amount", *spec.numeric)], axis=1)
    slot_ts = ts[rows]
    if spec.decision_token:
        if decision.get("event_type") is None:
            raise ValueError("decision.event_type is missing: the encoder reads the decision event")
        check_event_types({decision["event_type"]}, spec)
        kept_types.append(decision["event_type"])
        for name in values:
            values[name].append(decision.get(name))
        own = [decision.get(c) for c in ("amount", *spec.numeric)]
        raw = np.vstack([raw, np.array([[np.nan if v is None else v for v in own]], float)])
        slot_ts = np.append(slot_ts, decision_us)
    n = len(slot_ts)

    # Slots as the batch gather fills them: right-aligned, padding (all zeros) on the left.
    real = slice(K - n, K)
    mask = np.zeros((1, K), bool)
    mask[0, real] = True
    type_index = {t: i + 1 for i, t in enumerate(spec.event_types)}
    event_type = np.zeros((1, K), np.int32)
    event_type[0, real] = [type_index[t] for t in kept_types]
    cats = np.zeros((1, K, len(spec.categorical)), np.int32)
    first_seen = [c for c in spec.categorical if c.first_seen]
    keys = np.zeros((1, K, len(first_seen)), np.uint64)
    for j, c in enumerate(spec.categorical):
        if not c.first_seen:
            cats[0, real, j] = c.ids_of(values[c.name])
    for j, c in enumerate(first_seen):
        keys[0, real, j] = c.keys_of(values[c.name])
    code_first_seen(cats, keys, spec)
    nums = np.zeros((1, K, 2 * raw.shape[1]), np.float32)
    nums[0, real] = numeric_inputs(raw)
    padded_ts = np.zeros((1, K), np.int64)
    padded_ts[0, real] = slot_ts
    clock = np.zeros((1, K, 4), np.float32)
    clock[0, real] = clock_inputs(slot_ts)
    time = time_inputs(padded_ts, mask, np.array([decision_us]), clock)
    return {"event_type": event_type, "cats": cats, "nums": nums, "time": time, "mask": mask}
