"""The batch builder: every decision's history as arrays at once, vectorized (one sort, one
merge, numpy gathers; no loop per decision)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from eventml.sequences.coding import (
    SequenceSpec,
    code_first_seen,
    event_inputs,
    time_inputs,
    utc_us,
)


def build_sequences(
    events: pl.DataFrame,
    decisions: pl.DataFrame,
    spec: SequenceSpec,
    max_len: int = 128,
    label_columns: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Arrays for each decision row, in the decisions' order: its entity's last `max_len` events
    strictly before the decision's `ts`.

    `decisions` needs `entity_id` and `ts`; `label_columns` (nullable, e.g. 0/1 with null where
    unmatured) become `labels` (N, n) float32 with NaN for null. Returns event_type (N, K) int32,
    cats (N, K, C) int32, nums (N, K, F) float32, time (N, K, 6) float32, mask (N, K) bool and
    labels when asked for.
    """
    K = max_len
    columns = ("event_type", "amount", *(c.name for c in spec.categorical), *spec.numeric)
    ev = events.select("entity_id", "ts", "event_id", *columns)
    ev = ev.with_columns(utc_us(ev["ts"])).sort("entity_id", "ts", "event_id")
    feats = event_inputs(ev, spec)

    # Entity codes: the index of an entity's run in the sorted events; its events are the
    # contiguous rows [first[code], first[code] + count[code]).
    runs = ev.group_by("entity_id", maintain_order=True).len().with_row_index("code")
    first = np.concatenate([[0], np.cumsum(runs["len"].to_numpy())[:-1]]).astype(np.int64)
    ev_code = np.repeat(runs["code"].to_numpy().astype(np.int64), runs["len"].to_numpy())
    dec = decisions.select("entity_id", utc_us(decisions["ts"]).alias("ts")).join(
        runs.select("entity_id", "code"), on="entity_id", how="left", maintain_order="left"
    )
    has_events = dec["code"].is_not_null().to_numpy()
    dec_code = dec["code"].fill_null(0).to_numpy().astype(np.int64)[has_events]
    dec_ts = dec["ts"].dt.epoch("us").to_numpy()

    # Merge decisions into the sorted event stream by (entity, ts). At an equal instant a decision
    # sorts before events (kind 0 < 1), so an event at the decision's own time counts as after it.
    # lexsort is stable and events enter in sorted order, so an event's merged rank follows its row.
    n_ev = len(ev)
    kind = np.concatenate([np.ones(n_ev, np.int8), np.zeros(len(dec_code), np.int8)])
    order = np.lexsort(
        (
            kind,
            np.concatenate([feats["ts"], dec_ts[has_events]]),
            np.concatenate([ev_code, dec_code]),
        )
    )
    events_before = np.cumsum(kind[order]) - kind[order]  # events ahead of each merged slot
    is_dec = order >= n_ev
    end = np.empty(len(dec_code), np.int64)  # one past the last prior event's row
    end[order[is_dec] - n_ev] = events_before[is_dec]
    n_prior = np.zeros(len(dec), np.int64)
    n_prior[has_events] = np.minimum(end - first[dec_code], K)
    end_all = np.zeros(len(dec), np.int64)
    end_all[has_events] = end

    # Right-aligned gather: slot j of a row holds event end-K+j, real when j >= K - n_prior.
    # Padding slots point at an appended all-zero row, so a gather alone pads them.
    j = np.arange(K)
    mask = j[None, :] >= (K - n_prior)[:, None]  # (N, K)
    rows = np.where(mask, end_all[:, None] - K + j[None, :], n_ev)

    def gather(a: np.ndarray) -> np.ndarray:
        return np.take(np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)]), rows, axis=0)

    slots = {k: gather(feats[k]) for k in ("event_type", "cats", "keys", "nums", "clock", "ts")}
    code_first_seen(slots["cats"], slots["keys"], spec)
    arrays = {
        "event_type": slots["event_type"],
        "cats": slots["cats"],
        "nums": slots["nums"],
        "time": time_inputs(slots["ts"], mask, dec_ts, slots["clock"]),
        "mask": mask,
    }
    if label_columns:
        arrays["labels"] = np.stack(
            [
                decisions[c].cast(pl.Float32).fill_null(float("nan")).to_numpy()
                for c in label_columns
            ],
            axis=1,
        ).astype(np.float32)
    return arrays
