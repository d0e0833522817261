"""The batch builder: every decision's history as arrays at once, vectorized (one sort, one
merge, numpy gathers; no loop per decision)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from eventml.sequences.coding import (
    HISTORY_ORDER,
    SequenceSpec,
    code_first_seen,
    event_inputs,
    time_inputs,
    utc_us,
)

ROWS_PER_BLOCK = 32_768  # rows gathered at a time: ~0.3 GB of intermediates at K=64


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
    # Every event's inputs depend on its own row only: coded in the table's order, then put in
    # (entity, ts, event_id) order by a permutation. Sorting only the keys with a row index
    # takes a quarter of the memory of sorting every column (24M events: 2.5 GB against 10 GB,
    # and 10 s against 22 s; the permutation gives back most of that time).
    feats = event_inputs(events.select(*spec.input_columns, utc_us(events["ts"])), spec)
    ev = events.select(HISTORY_ORDER).with_row_index("row").sort(HISTORY_ORDER)
    sorted_rows = ev["row"].to_numpy()
    # One array at a time (never two copies of every input), each with an all-zero row appended:
    # padding slots point at it, so a gather alone pads them.
    for name, values in feats.items():
        feats[name] = np.concatenate(
            [values[sorted_rows], np.zeros((1, *values.shape[1:]), values.dtype)]
        )

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
            np.concatenate([feats["ts"][:n_ev], dec_ts[has_events]]),
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
    # Padding slots point at the appended zero row (row n_ev). By blocks of rows into arrays made
    # once: the gather's intermediates (row indices, id keys, clocks, timestamps) are about the
    # arrays' size again.
    j = np.arange(K)

    def block(rows: slice) -> dict[str, np.ndarray]:
        mask = j[None, :] >= (K - n_prior[rows])[:, None]  # (n, K)
        at = np.where(mask, end_all[rows, None] - K + j[None, :], n_ev)
        slots = {k: np.take(a, at, axis=0) for k, a in feats.items()}
        code_first_seen(slots["cats"], slots["keys"], spec)
        return {
            "event_type": slots["event_type"],
            "cats": slots["cats"],
            "nums": slots["nums"],
            "time": time_inputs(slots["ts"], mask, dec_ts[rows], slots["clock"]),
            "mask": mask,
        }

    arrays: dict[str, np.ndarray] = {}
    for start in range(0, max(len(dec), 1), ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        for name, values in block(rows).items():
            arrays.setdefault(name, np.empty((len(dec), *values.shape[1:]), values.dtype))
            arrays[name][rows] = values
    if label_columns:
        arrays["labels"] = np.stack(
            [
                decisions[c].cast(pl.Float32).fill_null(float("nan")).to_numpy()
                for c in label_columns
            ],
            axis=1,
        ).astype(np.float32)
    return arrays
