"""History → tensors: each decision's most recent prior events as fixed-size arrays for the encoder.

`build_sequences` turns an event table and a table of decisions into arrays, vectorized (one
sort, one merge, numpy gathers; no loop per decision). `build_one` — the request path — takes the
same steps for one entity's history in plain numpy (Polars' per-call overhead would be most of a
request's cost) and codes events with the same helpers, so offline and served inputs agree
exactly; tests hold the two together.

Choices a reader should know:
- Only events strictly before the decision instant enter; an event at the same microsecond is
  treated as after it (the decision event itself, or anything logged with it).
- The last K events are kept, oldest first, right-aligned: padding is on the left and position
  K-1 always holds the most recent event.
- Ties in time are ordered by event_id, so a shuffled event table builds the same arrays.
- Time since the previous event is measured inside the window (the oldest kept event gets 0), so
  serving needs only the entity's last K events to reproduce training inputs.
- Categorical ids: 0 = null (and padding). A column with declared `categories` in the dataset
  spec, or with at most `max_vocab` distinct training values, gets a vocabulary (ids 1..V, and
  V+1 for any other value).
- A column the pack lists under `identifiers`, or a larger one, is an identifier (a device id,
  an IP address, a terminal), and by default its id says only
  in which order the value first appeared among the kept events: the history's first device is
  1, the next new one 2, a return to the first device 1 again ("first seen" coding, capped). A
  global id per value would let the encoder recognise people by their devices and memorise
  their outcomes instead of learning what histories look like (on the demo world its
  default AUC was 0.96 on the people it learned labels from and 0.56 out of time; coded by
  first appearance, 0.64-0.66 and 0.62 after the same 8 epochs, 0.69-0.74 and 0.63-0.65 after
  16: bench/embedding_lift.py). The order keeps what
  generalises: a new device among familiar ones. `high_cardinality="hash"` instead hashes each
  value into `hash_buckets`, for identifiers whose identity is the signal (a merchant, say).
  Values are compared, and hashed, by BLAKE2b of their UTF-8 bytes, not polars' `hash` or
  Python's `hash()`: those change across library versions and processes, and a model must see
  the same id for the same value in training, in the Bento, and next year.
- Numeric fields (amount first, then the spec's numeric columns): sign(x)·log1p(|x|) clipped to
  ±NUMERIC_CLIP, null → 0 with a separate is-null flag, so 0 and "unknown" stay distinct.

The arrays keep ids as int32 to halve memory at training scale; `eventml.encoder.iter_batches`
widens them to the int64 batch format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl

from eventml.schema import TS_TYPE, DatasetSpec

TIME_FEATURES = (
    "log_dt_prev",
    "log_dt_decision",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
)
NUMERIC_CLIP = 30.0
US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stable_hash(value: str) -> int:
    """A 64-bit hash of a string that is the same in every process, platform and version."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class CategoricalCoding:
    """How one categorical column becomes ids: a vocabulary, hash buckets, or the order in which
    each value was first seen in the history (ids 1..first_seen, the last shared by later ones)."""

    name: str
    vocabulary: tuple[str, ...] = ()
    hash_buckets: int = 0
    first_seen: int = 0

    @property
    def cardinality(self) -> int:
        # 0 = null; vocabulary ids 1..V and V+1 for unseen values; or 1..buckets; or 1..first_seen.
        if self.first_seen:
            return self.first_seen + 1
        return len(self.vocabulary) + 2 if not self.hash_buckets else self.hash_buckets + 1

    def keys(self, values: pl.Series) -> np.ndarray:
        """(N,) uint64 keys of a first-seen column, 0 for null: `first_seen_ids` compares them."""
        distinct = values.drop_nulls().unique().to_list()
        keys = [stable_hash(v) or 1 for v in distinct]  # 0 is null's
        mapped = values.replace_strict(distinct, keys, default=0, return_dtype=pl.UInt64)
        return mapped.fill_null(0).to_numpy()

    def keys_of(self, values: Sequence[str | None]) -> np.ndarray:
        """`keys` of a few values (one request's events), without a Series round trip."""
        return np.array([0 if v is None else stable_hash(v) or 1 for v in values], dtype=np.uint64)

    def _codes(self, distinct: Iterable[str]) -> dict[str, int]:
        """The id of each (non-null) value."""
        if self.hash_buckets:
            return {v: 1 + stable_hash(v) % self.hash_buckets for v in distinct}
        index = {v: i + 1 for i, v in enumerate(self.vocabulary)}
        return {v: index.get(v, len(self.vocabulary) + 1) for v in distinct}

    def ids(self, values: pl.Series) -> np.ndarray:
        """(N,) int32 ids. Only the distinct values are hashed or looked up, then mapped back."""
        codes = self._codes(values.drop_nulls().unique().to_list())
        mapped = values.replace_strict(
            list(codes), list(codes.values()), default=0, return_dtype=pl.Int32
        )
        return mapped.fill_null(0).to_numpy()

    def ids_of(self, values: Sequence[str | None]) -> np.ndarray:
        """`ids` of a few values (one request's events), without a Series round trip."""
        codes = self._codes({v for v in values if v is not None})
        return np.array([codes.get(v, 0) for v in values], dtype=np.int32)


@dataclass(frozen=True)
class SequenceSpec:
    """Everything needed to turn events into encoder inputs; JSON round-trips so the serving
    bundle ships the exact coding the encoder was trained with."""

    event_types: tuple[str, ...]
    categorical: tuple[CategoricalCoding, ...] = ()
    numeric: tuple[str, ...] = ()

    @classmethod
    def fit(
        cls,
        spec: DatasetSpec,
        events: pl.DataFrame | None = None,
        *,
        max_vocab: int = 64,
        high_cardinality: Literal["first_seen", "hash"] = "first_seen",
        first_seen: int = 8,
        hash_buckets: int = 1024,
    ) -> SequenceSpec:
        """Each categorical column's coding: the spec's declared categories where it has them
        (so an id means what the feature codes mean), else learned from (training) events; a
        column with more than `max_vocab` values is coded as `high_cardinality` says (see the
        module docstring)."""
        if high_cardinality not in ("first_seen", "hash"):
            raise ValueError(
                f"high_cardinality={high_cardinality!r}: use 'first_seen' (the order each value "
                "first appears in a history) or 'hash' (a bucket per value)"
            )
        if high_cardinality == "first_seen" and first_seen < 1:
            raise ValueError(f"first_seen={first_seen}: the cap on first-seen ids must be >= 1")
        codings = []
        for name in spec.input_categorical:
            if name in spec.categories:
                codings.append(CategoricalCoding(name, vocabulary=tuple(spec.categories[name])))
                continue
            if name in spec.identifiers:  # ids, whatever their count in the training events
                coded = {"first_seen": first_seen} if high_cardinality == "first_seen" else {
                    "hash_buckets": hash_buckets}  # fmt: skip
                codings.append(CategoricalCoding(name, **coded))
                continue
            if events is None:
                raise ValueError(
                    f"categorical column {name!r} has no declared categories in spec "
                    f"{spec.name!r}; declare them or pass training events to learn them from"
                )
            distinct = events[name].drop_nulls().unique()
            if len(distinct) <= max_vocab:
                vocabulary = tuple(sorted(distinct.to_list()))
                codings.append(CategoricalCoding(name, vocabulary=vocabulary))
            elif high_cardinality == "first_seen":
                codings.append(CategoricalCoding(name, first_seen=first_seen))
            else:
                codings.append(CategoricalCoding(name, hash_buckets=hash_buckets))
        return cls(
            event_types=tuple(spec.event_types),
            categorical=tuple(codings),
            numeric=spec.input_numeric,  # a label column is never an encoder input
        )

    # The encoder's input sizes; pass them on as EncoderConfig(**seq_spec.encoder_dims(), ...).
    def encoder_dims(self) -> dict:
        return {
            "n_event_types": len(self.event_types) + 1,  # + the padding id 0
            "cat_cardinalities": tuple(c.cardinality for c in self.categorical),
            "n_numeric": 2 * (1 + len(self.numeric)),  # value and is-null flag, amount included
            "n_time_features": len(TIME_FEATURES),
        }

    def to_json(self) -> str:
        d = asdict(self)
        # A first-seen column is saved without the vocabulary and hash fields, so that code from
        # before first-seen coding refuses the spec (KeyError) instead of reading an empty
        # vocabulary and coding every device as the same unknown value.
        d["categorical"] = [
            {"name": c["name"], "first_seen": c["first_seen"]} if c["first_seen"] else c
            for c in d["categorical"]
        ]
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SequenceSpec:
        d = json.loads(text)
        codings = tuple(
            # Specs saved before first-seen coding have no such field: they hashed.
            CategoricalCoding(
                c["name"],
                tuple(c.get("vocabulary", ())),
                c.get("hash_buckets", 0),
                c.get("first_seen", 0),
            )
            for c in d["categorical"]
        )
        return cls(
            event_types=tuple(d["event_types"]), categorical=codings, numeric=tuple(d["numeric"])
        )


def _check_event_types(present: set[str | None], spec: SequenceSpec) -> None:
    unknown = {t for t in present if t is not None} - set(spec.event_types)
    if unknown or None in present:
        raise ValueError(
            f"event types {sorted(unknown) or [None]} are not in the sequence spec's vocabulary "
            f"{list(spec.event_types)}; validate events with eventml.schema.validate first"
        )


def _numeric_inputs(raw: np.ndarray) -> np.ndarray:
    """(N, F) float64 values (NaN for null) → (N, 2F) float32: the clipped signed log1p of each,
    then each one's is-null flag."""
    is_null = np.isnan(raw)
    value = np.clip(np.sign(raw) * np.log1p(np.abs(raw)), -NUMERIC_CLIP, NUMERIC_CLIP)
    return np.concatenate([np.where(is_null, 0.0, value), is_null], axis=1).astype(np.float32)


def _clock(ts: np.ndarray) -> np.ndarray:
    """(N,) UTC µs → (N, 4) float32: hour of the day and day of the week on the unit circle."""
    hour = (ts % US_PER_DAY) / (3600 * US_PER_SECOND)  # fractional hour of the UTC day
    weekday = (ts // US_PER_DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return np.stack(
        [
            np.sin(2 * np.pi * hour / 24),
            np.cos(2 * np.pi * hour / 24),
            np.sin(2 * np.pi * weekday / 7),
            np.cos(2 * np.pi * weekday / 7),
        ],
        axis=1,
    ).astype(np.float32)


def _event_features(events: pl.DataFrame, spec: SequenceSpec) -> dict[str, np.ndarray]:
    """Per-event inputs that do not depend on the decision, one row per (sorted) event."""
    _check_event_types(set(events["event_type"].unique().to_list()), spec)
    type_ids = events["event_type"].replace_strict(
        list(spec.event_types), list(range(1, len(spec.event_types) + 1)), return_dtype=pl.Int32
    )
    n = len(events)
    # First-seen columns are coded per history after the gather; their slot here holds 0.
    cats = np.zeros((n, len(spec.categorical)), np.int32)
    for j, c in enumerate(spec.categorical):
        if not c.first_seen:
            cats[:, j] = c.ids(events[c.name])
    first_seen = [c for c in spec.categorical if c.first_seen]
    keys = np.zeros((n, len(first_seen)), np.uint64)
    for j, c in enumerate(first_seen):
        keys[:, j] = c.keys(events[c.name])
    raw = np.stack([_floats(events[c]) for c in ("amount", *spec.numeric)], axis=1)
    ts = events["ts"].dt.epoch("us").to_numpy()
    return {
        "event_type": type_ids.to_numpy(),
        "cats": cats,
        "keys": keys,
        "nums": _numeric_inputs(raw),
        "clock": _clock(ts),
        "ts": ts,
    }


def first_seen_ids(keys: np.ndarray, cap: int) -> np.ndarray:
    """(N, K) value keys, 0 for null or padding → (N, K) int32: each value's order of first
    appearance in its row, 1..cap (cap also for every later value), 0 for null.

    Vectorized by a sort per row: equal keys become runs ordered by position, so a run's first
    element is the value's first position, and a value's id counts the first positions up to it.
    """
    N, K = keys.shape
    slots = np.arange(K)
    order = np.lexsort((np.broadcast_to(slots, (N, K)), keys), axis=1)
    ordered = np.take_along_axis(keys, order, axis=1)
    starts = np.ones((N, K), bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, slots, 0), axis=1)
    first = np.empty_like(order)  # each slot's value's first slot
    np.put_along_axis(first, order, np.take_along_axis(order, run_start, axis=1), axis=1)
    real = keys != 0
    rank = np.cumsum((first == slots) & real, axis=1)
    return np.where(real, np.minimum(np.take_along_axis(rank, first, axis=1), cap), 0).astype(
        np.int32
    )


def _code_first_seen(
    cats: np.ndarray, keys: np.ndarray, spec: SequenceSpec, rows_per_chunk: int = 16_384
) -> None:
    """Fill the first-seen columns of gathered (N, K, C) `cats` in place from gathered keys, a
    chunk of rows at a time: the sort's temporaries are a few (rows, K) int64 arrays."""
    first_seen = [j for j, c in enumerate(spec.categorical) if c.first_seen]
    for i, j in enumerate(first_seen):
        for start in range(0, len(cats), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            cats[rows, :, j] = first_seen_ids(keys[rows, :, i], spec.categorical[j].first_seen)


def _time_features(
    ts: np.ndarray, mask: np.ndarray, decision_ts: np.ndarray, clock: np.ndarray
) -> np.ndarray:
    """(N, K, 6) float32 from the slots' event times (N, K) µs, real-slot mask (N, K), decision
    times (N,) µs and clock features (N, K, 4); padding slots hold 0 everywhere.

    Seconds since the previous kept event (0 for the oldest) and until the decision. Real events
    are contiguous at the right, so slot k has a real predecessor iff slot k-1 is real."""
    N, K = mask.shape
    time_feats = np.zeros((N, K, len(TIME_FEATURES)), np.float32)
    gap = np.diff(ts, axis=1).astype(np.float32) / US_PER_SECOND
    time_feats[:, 1:, 0] = np.log1p(np.where(mask[:, :-1], gap, 0.0))
    until = (decision_ts[:, None] - ts).astype(np.float32) / US_PER_SECOND
    time_feats[..., 1] = np.log1p(np.where(mask, until, 0.0))
    time_feats[..., 2:] = clock
    return time_feats


def _utc_us(ts: pl.Series) -> pl.Series:
    if not isinstance(ts.dtype, pl.Datetime):
        raise TypeError(f"decision ts must be a Datetime column, got {ts.dtype}")
    if ts.dtype == TS_TYPE:
        return ts
    if ts.dtype.time_zone is None:
        ts = ts.dt.replace_time_zone("UTC")
    return ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us")


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
    ev = events.select(
        "entity_id",
        "event_id",
        "ts",
        "event_type",
        "amount",
        *[c.name for c in spec.categorical],
        *spec.numeric,
    )
    ev = ev.with_columns(_utc_us(ev["ts"])).sort("entity_id", "ts", "event_id")
    feats = _event_features(ev, spec)

    # Entity codes: the index of an entity's run in the sorted events; its events are the
    # contiguous rows [first[code], first[code] + count[code]).
    runs = ev.group_by("entity_id", maintain_order=True).len().with_row_index("code")
    first = np.concatenate([[0], np.cumsum(runs["len"].to_numpy())[:-1]]).astype(np.int64)
    ev_code = np.repeat(runs["code"].to_numpy().astype(np.int64), runs["len"].to_numpy())
    dec = decisions.select("entity_id", _utc_us(decisions["ts"]).alias("ts")).join(
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

    cats = gather(feats["cats"])
    _code_first_seen(cats, gather(feats["keys"]), spec)
    arrays = {
        "event_type": gather(feats["event_type"]),
        "cats": cats,
        "nums": gather(feats["nums"]),
        "time": _time_features(gather(feats["ts"]), mask, dec_ts, gather(feats["clock"])),
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


def build_one(
    history: pl.DataFrame, decision_ts: datetime, spec: SequenceSpec, max_len: int = 128
) -> dict[str, np.ndarray]:
    """The serving path: one entity's history (any events, any order; those at or after the
    decision are ignored) → arrays with a leading batch dimension of 1, exactly as
    `build_sequences` builds them for the same decision.

    The same steps as `build_sequences` on one entity, in numpy: a history is a few hundred rows
    at most, where a Polars sort and join cost milliseconds of per-call overhead. Only the kept
    events are coded, with the helpers the batch path uses."""
    K = max_len
    if decision_ts.tzinfo is None:
        decision_ts = decision_ts.replace(tzinfo=UTC)
    decision_us = (decision_ts - EPOCH) // timedelta(microseconds=1)
    types = history["event_type"].to_list()
    _check_event_types(set(types), spec)  # every row, as the batch path checks
    ts = _utc_us(history["ts"]).dt.epoch("us").to_numpy()

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
    _code_first_seen(cats, keys, spec)
    raw = np.stack([_floats(history[c])[rows] for c in ("amount", *spec.numeric)], axis=1)
    nums = np.zeros((1, K, 2 * raw.shape[1]), np.float32)
    nums[0, real] = _numeric_inputs(raw)
    slot_ts = np.zeros((1, K), np.int64)
    slot_ts[0, real] = ts[rows]
    clock = np.zeros((1, K, 4), np.float32)
    clock[0, real] = _clock(ts[rows])
    time = _time_features(slot_ts, mask, np.array([decision_us]), clock)
    return {"event_type": event_type, "cats": cats, "nums": nums, "time": time, "mask": mask}


def _floats(column: pl.Series) -> np.ndarray:
    """float64 values, NaN for null (a cast only where needed: each Polars call costs µs)."""
    return (column if column.dtype == pl.Float64 else column.cast(pl.Float64)).to_numpy()
