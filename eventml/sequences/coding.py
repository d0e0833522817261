"""How events become the encoder's inputs: the coding of each column (`SequenceSpec`,
`CategoricalCoding`), and the per-event and per-slot arrays both builders share.

The coding is fitted once, at training, and saved with the model (`SequenceSpec.to_json`), so the
Bento codes a request's events exactly as training coded the table's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
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
# A history's order (ties at one instant by event id), and the inputs every pack's events have.
HISTORY_ORDER = ("entity_id", "ts", "event_id")
EVENT_INPUTS = ("event_type", "amount")
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
        events: pl.DataFrame | pl.LazyFrame | None = None,
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
            distinct = events.lazy().select(pl.col(name).drop_nulls().unique()).collect()[name]
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

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The event columns the encoder's inputs are coded from."""
        return (*EVENT_INPUTS, *(c.name for c in self.categorical), *self.numeric)

    @property
    def event_columns(self) -> tuple[str, ...]:
        """All a reader of the events table need load to build sequences: the inputs and the
        keys that order them (the table holds other columns, some wide, besides)."""
        return (*HISTORY_ORDER, *self.input_columns)

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


def sequence_columns(spec: DatasetSpec) -> tuple[str, ...]:
    """The event columns a pack's sequences are built from (`SequenceSpec.fit(spec)`'s
    `event_columns`), known before any spec is fitted: what the encoder's step loads."""
    return (*HISTORY_ORDER, *EVENT_INPUTS, *spec.input_categorical, *spec.input_numeric)


def check_event_types(present: set[str | None], spec: SequenceSpec) -> None:
    unknown = {t for t in present if t is not None} - set(spec.event_types)
    if unknown or None in present:
        raise ValueError(
            f"event types {sorted(unknown) or [None]} are not in the sequence spec's vocabulary "
            f"{list(spec.event_types)}; validate events with eventml.schema.validate first"
        )


def numeric_inputs(raw: np.ndarray) -> np.ndarray:
    """(N, F) float64 values (NaN for null) → (N, 2F) float32: the clipped signed log1p of each,
    then each one's is-null flag."""
    is_null = np.isnan(raw)
    value = np.clip(np.sign(raw) * np.log1p(np.abs(raw)), -NUMERIC_CLIP, NUMERIC_CLIP)
    return np.concatenate([np.where(is_null, 0.0, value), is_null], axis=1).astype(np.float32)


def clock_inputs(ts: np.ndarray) -> np.ndarray:
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


def event_inputs(events: pl.DataFrame, spec: SequenceSpec) -> dict[str, np.ndarray]:
    """Per-event inputs that do not depend on the decision, one row per (sorted) event."""
    check_event_types(set(events["event_type"].unique().to_list()), spec)
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
    raw = np.stack([floats(events[c]) for c in ("amount", *spec.numeric)], axis=1)
    ts = events["ts"].dt.epoch("us").to_numpy()
    return {
        "event_type": type_ids.to_numpy(),
        "cats": cats,
        "keys": keys,
        "nums": numeric_inputs(raw),
        "clock": clock_inputs(ts),
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


def code_first_seen(
    cats: np.ndarray, keys: np.ndarray, spec: SequenceSpec, rows_per_chunk: int = 16_384
) -> None:
    """Fill the first-seen columns of gathered (N, K, C) `cats` in place from gathered keys, a
    chunk of rows at a time: the sort's temporaries are a few (rows, K) int64 arrays."""
    first_seen = [j for j, c in enumerate(spec.categorical) if c.first_seen]
    for i, j in enumerate(first_seen):
        for start in range(0, len(cats), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            cats[rows, :, j] = first_seen_ids(keys[rows, :, i], spec.categorical[j].first_seen)


def time_inputs(
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


def utc_us(ts: pl.Series) -> pl.Series:
    if not isinstance(ts.dtype, pl.Datetime):
        raise TypeError(f"decision ts must be a Datetime column, got {ts.dtype}")
    if ts.dtype == TS_TYPE:
        return ts
    if ts.dtype.time_zone is None:
        ts = ts.dt.replace_time_zone("UTC")
    return ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us")


def floats(column: pl.Series) -> np.ndarray:
    """float64 values, NaN for null (a cast only where needed: each Polars call costs µs)."""
    return (column if column.dtype == pl.Float64 else column.cast(pl.Float64)).to_numpy()
