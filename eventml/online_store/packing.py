"""What every online-store backend shares: an entity's history packed as one Arrow IPC stream,
merged, cut and read back the same way, so SQLite and Redis answer every read identically."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pyarrow as pa

from eventml.features import ACTIVITY_SCHEMA
from eventml.sequences import utc_us

_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream format's end marker
NO_BOUND = 2**63 - 1  # µs after every datetime Python can hold: no bound
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Entities per statement and per re-packing step: under the 999 parameters older SQLite allows,
# and a bounded slice of the store in memory while a backfill re-packs every entity.
CHUNK = 500


def us(ts: datetime) -> int:
    """µs since the epoch, exactly (a naive datetime is UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // timedelta(microseconds=1)


def day_number(d: date) -> int:
    return (d - date(1970, 1, 1)).days


def pack(frame: pl.DataFrame) -> bytes:
    return _ipc_stream(_arrow(frame))


def _arrow(frame: pl.DataFrame) -> pa.Table:
    # The oldest compat level: plain Arrow strings, which any Arrow reader understands.
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest())


def _ipc_stream(table: pa.Table) -> bytes:
    """`table` (or a slice of it, written compactly) as one Arrow IPC stream. Written by pyarrow:
    a quarter of the cost of Polars' writer for the small frames a history is."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def arriving(events: pl.DataFrame, schema: dict) -> pl.DataFrame:
    """Events as stored: in the event schema, UTC, and within one write as across writes the
    last row of an (entity, event_id) wins."""
    return (
        events.with_columns(utc_us(events["ts"]))  # naive instants are UTC
        .select(pl.col(c).cast(t) for c, t in schema.items())
        .unique(["entity_id", "event_id"], keep="last", maintain_order=True)
    )


def merged(stored: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Stored histories with `new` events written over them, by (entity, event_id)."""
    return (
        pl.concat([stored, new])
        .unique(["entity_id", "event_id"], keep="last")
        # (entity_id, ts, event_id) is a total order, byte-wise as SQLite's was.
        .sort("entity_id", "ts", "event_id")
    )


def inside(start: datetime, end: datetime) -> pl.Expr:
    """Events with start <= ts < end."""
    return pl.col("ts").dt.epoch("us").is_between(us(start), us(end), closed="left")


def packed_histories(frame: pl.DataFrame) -> list[tuple[str, int, int, int, bytes]]:
    """(entity_id, events, first µs, last µs, packed) per entity of `frame` (sorted by entity,
    ts, event_id)."""
    if frame.height == 0:
        return []
    table, stamps = _arrow(frame), frame["ts"].to_numpy().view(np.int64)
    # Each entity's slice as the bytes a stream writer gives (the schema message, the slice's
    # record batch written compactly, the end marker), joined here: a writer per entity cost a
    # third more, and a stream's consumer packs one slice for each entity of a batch.
    schema = table.schema.serialize().to_pybytes()
    (batch,) = table.combine_chunks().to_batches()
    runs = frame["entity_id"].rle().struct.unnest()  # one run per entity: (len, value)
    ends = runs["len"].cum_sum().to_list()
    rows = []
    for entity_id, n, end in zip(runs["value"].to_list(), runs["len"].to_list(), ends):
        start = end - n
        packed = schema + batch.slice(start, n).serialize().to_pybytes() + _END_OF_STREAM
        rows.append((entity_id, n, int(stamps[start]), int(stamps[end - 1]), packed))
    return rows


def unpacked(
    packed: dict[str, bytes | pl.DataFrame],
    entity_ids: list[str],
    before: list[int] | None,
    empty: pl.DataFrame,
) -> pl.DataFrame:
    """The stored events of `entity_ids` (sorted, distinct) from their packed histories (or
    histories already read, in time order), ordered by entity, ts and event_id; with `before`,
    each entity's events strictly before its bound."""
    frames = []
    # Slices and NumPy rather than Polars queries, which cost ~80 µs each: one request's whole
    # read is less than that.
    for i, entity_id in enumerate(entity_ids):
        if entity_id not in packed:
            continue
        events = packed[entity_id]
        if not isinstance(events, pl.DataFrame):
            events = pl.read_ipc_stream(events)
        if before is not None:  # packed in time order: the events before it are a prefix
            stamps = events["ts"].to_numpy().view(np.int64)
            events = events.head(int(np.searchsorted(stamps, before[i], side="left")))
        frames.append(events)
    # Contiguous (~1 ms for a batch): joins and gathers over one chunk per entity cost several
    # times that.
    return pl.concat(frames, rechunk=True) if frames else empty.clone()


def latest_bounds(
    entity_ids: list[str], before: list[datetime | None] | None
) -> tuple[list[str], list[int]]:
    """The distinct entities of a batch, sorted, each with the latest instant (µs) given for it:
    a batch of decisions reads no event none of them can use."""
    if before is None:
        before = [None] * len(entity_ids)
    if len(before) != len(entity_ids):
        raise ValueError(f"{len(before)} instants given for {len(entity_ids)} entity ids")
    bound: dict[str, int] = {}
    for entity_id, ts in zip(entity_ids, before):
        stamp = NO_BOUND if ts is None else us(ts)
        bound[entity_id] = max(bound.get(entity_id, stamp), stamp)
    # Sorted in Python: code point order is UTF-8 byte order, the order Polars sorts in.
    asked = sorted(bound)
    return asked, [bound[e] for e in asked]


def activity_rows(activity: pl.DataFrame) -> list[tuple[str, str, int, str, int]]:
    """(key_column, key, day number, measure, count) per row of `ACTIVITY_SCHEMA` rows."""
    return activity.select(
        "key_column", "key", (pl.col("day") - pl.date(1970, 1, 1)).dt.total_days(), "measure",
        "count",
    ).rows()  # fmt: skip


def activity_frame(rows: list[tuple]) -> pl.DataFrame:
    """`activity_rows` back in `ACTIVITY_SCHEMA`."""
    frame = pl.DataFrame(rows, schema={**ACTIVITY_SCHEMA, "day": pl.Int32}, orient="row")
    return frame.with_columns(pl.col("day").cast(pl.Date)).select(list(ACTIVITY_SCHEMA))


def packed_references(rows: pl.DataFrame) -> list[tuple[str, bytes]]:
    """(key, packed rows) per key of a reference table (its key column first)."""
    key = rows.columns[0]
    return [
        (value, pack(part))
        for (value,), part in rows.partition_by(key, as_dict=True, maintain_order=True).items()
        if value is not None
    ]
