"""The online store: each entity's event history, for scoring one live request.

Serving computes features and sequences with the same functions as training, from the entity's
history, so the store keeps the events themselves (the feature set has all-history windows, so
no event can be dropped without keeping a running aggregate in its place). `OnlineStore` is the
interface; `SQLiteOnlineStore` is the embedded default (WAL mode: readers never block the
writer).

Layout: one row per entity, holding its whole history packed as one Arrow IPC stream, sorted
by (ts, event_id). Scoring reads histories, many at a time, far more often than days are
published, and a row per event cost a Python object per value on every read (a batch of 256
decisions reads ~30k events: ~100 ms as SQLite rows, ~15 ms as 256 packed histories). A write
or a delete re-packs only the entities it touches. A key-value backend (Redis) would keep the
same value under one key per entity behind the same methods.

Keyed features (per terminal, per merchant) read another table: each key's activity per day
(`eventml.features.key_activity`), published with the same days as the events, in the same
transaction, so a request reads both as of the same publication. The pack's reference tables
(`eventml.references`) are held whole, packed per key, for attaching them to a request's
decision and recent events as ingest attached them to stored events.
"""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from eventml.features import ACTIVITY_SCHEMA
from eventml.home import interprocess_lock
from eventml.schema import DatasetSpec
from eventml.sequences import utc_us

_NO_BOUND = 2**63 - 1  # µs after every datetime Python can hold: no bound
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Entities per statement and per re-packing step: under the 999 parameters older SQLite allows,
# and a bounded slice of the store in memory while a backfill re-packs every entity.
_CHUNK = 500


class OnlineStore(Protocol):
    def write(self, events: pl.DataFrame) -> int:
        """Insert or replace events (by entity and event_id); returns rows written."""

    def delete_between(self, start: datetime, end: datetime) -> int:
        """Remove events with start <= ts < end; returns rows removed."""

    def replace_between(
        self,
        start: datetime,
        end: datetime,
        events: pl.DataFrame,
        activity: pl.DataFrame | None = None,
        references: dict[str, pl.DataFrame] | None = None,
    ) -> int:
        """Re-publish days: remove events with start <= ts < end and write `events`, with
        `activity` the keys' rows of the same days and with `references` these reference tables
        whole, atomically (a reader sees the old days or the new ones, never neither); returns
        rows removed."""

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        """The entity's events strictly before `before` (all if None), oldest first, at most the
        last `limit` of them, in the event table's schema."""

    def histories(
        self, entity_ids: list[str], before: list[datetime | None] | None = None
    ) -> pl.DataFrame:
        """Many entities' events at once (see `SQLiteOnlineStore.histories`)."""

    def write_activity(self, activity: pl.DataFrame) -> int:
        """Insert or replace keys' activity rows (by key column, key, day and measure)."""

    def activity(self, keys: dict[str, list[str]]) -> pl.DataFrame:
        """Every stored activity row of these keys (key column → key values), in
        `ACTIVITY_SCHEMA`."""

    def write_references(self, name: str, rows: pl.DataFrame) -> int:
        """Replace reference table `name` with `rows` (its clean rows), atomically."""

    def references(self, name: str, keys: list[str]) -> pl.DataFrame | None:
        """The rows of reference table `name` of these keys (None: the store has none)."""


def _us(ts: datetime) -> int:
    """µs since the epoch, exactly (a naive datetime is UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // timedelta(microseconds=1)


def _day(d: date) -> int:
    return (d - date(1970, 1, 1)).days


def _packed(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    # The oldest compat level: plain Arrow strings, which any Arrow reader understands.
    frame.write_ipc_stream(buffer, compat_level=pl.CompatLevel.oldest())
    return buffer.getvalue()


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SQLiteOnlineStore:
    def __init__(self, path: str | Path, spec: DatasetSpec, *, convert: bool = True):
        """`convert=False` (serving workers): a store still in the row-per-event layout is an
        error rather than converted here, which could keep a worker waiting on the write lock
        for as long as a large store takes; the `online_store` asset converts it."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = spec.event_schema()
        self._empty = pl.DataFrame(schema=self.schema)
        self._local = threading.local()  # one connection per thread: sqlite3 objects are not shared
        # Switching a new file to WAL takes an exclusive lock that SQLite's busy timeout does not
        # wait for: two processes opening a new store at once failed with "database is locked".
        with interprocess_lock(self.path.with_name(self.path.name + ".lock")):
            if not convert and self._has_event_rows(self._connect()):  # refused before any write
                raise RuntimeError(
                    f"the online store {self.path} is in the row-per-event layout of eventml "
                    "before packed histories: materialize the online_store asset once to convert it"
                )
            with self._connect() as db:
                # first_ts/last_ts (µs) find the entities a deletion touches; `events` counts.
                db.execute(
                    "CREATE TABLE IF NOT EXISTS histories (entity_id TEXT PRIMARY KEY, "
                    "events INTEGER NOT NULL, first_ts INTEGER NOT NULL, last_ts INTEGER NOT NULL, "
                    "packed BLOB NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS by_last_event ON histories (last_ts)")
                # Days since the epoch; one row per (key, day, measure) with a count.
                db.execute(
                    "CREATE TABLE IF NOT EXISTS key_activity (key_column TEXT NOT NULL, "
                    "key TEXT NOT NULL, day INTEGER NOT NULL, measure TEXT NOT NULL, "
                    "count INTEGER NOT NULL, PRIMARY KEY (key_column, key, day, measure))"
                )
                # Each key's rows of a reference table, packed as the histories are.
                db.execute(
                    "CREATE TABLE IF NOT EXISTS reference_rows (name TEXT NOT NULL, "
                    "key TEXT NOT NULL, packed BLOB NOT NULL, PRIMARY KEY (name, key))"
                )
        if convert:
            self._migrate_event_rows()

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "PRAGMA synchronous=NORMAL"
            )  # WAL + NORMAL: durable at checkpoints, fast commits
            self._local.db = db
        return db

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its first read: a write re-packs what it
        read, so no other writer may change those entities in between."""
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            yield db

    # ------------------------------------------------------------ packing

    def _pack(self, frame: pl.DataFrame) -> list[tuple]:
        """Rows of the histories table for `frame` (events sorted by entity, ts, event_id)."""
        rows = []
        for (entity_id,), events in frame.partition_by(
            "entity_id", maintain_order=True, as_dict=True
        ).items():
            us = events["ts"].to_numpy().view(np.int64)
            rows.append((entity_id, events.height, int(us[0]), int(us[-1]), _packed(events)))
        return rows

    def _put(self, db: sqlite3.Connection, frame: pl.DataFrame) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO histories (entity_id, events, first_ts, last_ts, packed) "
            "VALUES (?, ?, ?, ?, ?)",
            self._pack(frame),
        )

    @staticmethod
    def _fetch(db: sqlite3.Connection, entity_ids: list[str]) -> dict[str, bytes]:
        """The packed histories of those of `entity_ids` the store has."""
        packed: dict[str, bytes] = {}
        for chunk in _chunks(entity_ids):
            marks = ", ".join("?" for _ in chunk)
            packed.update(
                db.execute(
                    f"SELECT entity_id, packed FROM histories WHERE entity_id IN ({marks})", chunk
                )
            )
        return packed

    def _read(
        self, db: sqlite3.Connection, entity_ids: list[str], before: list[int] | None = None
    ) -> pl.DataFrame:
        """The stored events of `entity_ids` (sorted, distinct), ordered by entity, ts and
        event_id; with `before`, only each entity's events strictly before its bound (µs)."""
        packed = self._fetch(db, entity_ids)
        frames = []
        # Slices and NumPy rather than Polars queries, which cost ~80 µs each: one request's
        # whole read is less than that.
        for i, entity_id in enumerate(entity_ids):
            if entity_id not in packed:
                continue
            events = pl.read_ipc_stream(packed[entity_id])
            if before is not None:  # packed in time order: the events before it are a prefix
                us = events["ts"].to_numpy().view(np.int64)
                events = events.head(int(np.searchsorted(us, before[i], side="left")))
            frames.append(events)
        # Contiguous (~1 ms for a batch): joins and gathers over one chunk per entity cost
        # several times that.
        return pl.concat(frames, rechunk=True) if frames else self._empty.clone()

    # ------------------------------------------------------------ the interface

    def write(self, events: pl.DataFrame) -> int:
        if events.height == 0:
            return 0
        with self._writing() as db:  # one transaction: a day's events appear all at once
            self._merge(db, events)
        return events.height

    def delete_between(self, start: datetime, end: datetime) -> int:
        with self._writing() as db:
            return self._delete(db, start, end)

    def replace_between(
        self,
        start: datetime,
        end: datetime,
        events: pl.DataFrame,
        activity: pl.DataFrame | None = None,
        references: dict[str, pl.DataFrame] | None = None,
    ) -> int:
        with self._writing() as db:
            deleted = self._delete(db, start, end)
            self._merge(db, events)
            for name, rows in (references or {}).items():
                self._put_references(db, name, rows)
            if activity is not None:
                # Activity rows are whole days: the days of [start, end), given as midnights.
                span = (_day(start.date()), _day(end.date()))
                db.execute("DELETE FROM key_activity WHERE day >= ? AND day < ?", span)
                self._put_activity(db, activity)
        return deleted

    def write_activity(self, activity: pl.DataFrame) -> int:
        with self._writing() as db:
            self._put_activity(db, activity)
        return activity.height

    @staticmethod
    def _put_activity(db: sqlite3.Connection, activity: pl.DataFrame) -> None:
        rows = activity.select(
            "key_column", "key", (pl.col("day") - pl.date(1970, 1, 1)).dt.total_days(), "measure",
            "count",
        ).rows()  # fmt: skip
        db.executemany("INSERT OR REPLACE INTO key_activity VALUES (?, ?, ?, ?, ?)", rows)

    def activity(self, keys: dict[str, list[str]]) -> pl.DataFrame:
        rows = []
        db = self._connect()
        for column, values in keys.items():
            for chunk in _chunks(sorted({v for v in values if v is not None})):
                marks = ", ".join("?" for _ in chunk)
                rows += db.execute(
                    "SELECT key_column, key, day, measure, count FROM key_activity "
                    f"WHERE key_column = ? AND key IN ({marks})",
                    [column, *chunk],
                ).fetchall()
        names = list(ACTIVITY_SCHEMA)
        frame = pl.DataFrame(rows, schema={**ACTIVITY_SCHEMA, "day": pl.Int32}, orient="row")
        return frame.with_columns(pl.col("day").cast(pl.Date)).select(names)

    def write_references(self, name: str, rows: pl.DataFrame) -> int:
        with self._writing() as db:
            self._put_references(db, name, rows)
        return rows.height

    @staticmethod
    def _put_references(db: sqlite3.Connection, name: str, rows: pl.DataFrame) -> None:
        key = rows.columns[0]  # reference_schema: the key first
        packed = [
            (name, value, _packed(part))
            for (value,), part in rows.partition_by(key, as_dict=True, maintain_order=True).items()
            if value is not None
        ]
        db.execute("DELETE FROM reference_rows WHERE name = ?", (name,))
        db.executemany("INSERT INTO reference_rows VALUES (?, ?, ?)", packed)

    def references(self, name: str, keys: list[str]) -> pl.DataFrame | None:
        db, frames = self._connect(), []
        for chunk in _chunks(sorted({k for k in keys if k is not None})):
            marks = ", ".join("?" for _ in chunk)
            frames += [
                pl.read_ipc_stream(packed)
                for (packed,) in db.execute(
                    f"SELECT packed FROM reference_rows WHERE name = ? AND key IN ({marks})",
                    [name, *chunk],
                )
            ]
        return pl.concat(frames) if frames else None

    def _merge(self, db: sqlite3.Connection, events: pl.DataFrame) -> None:
        new = (
            events.with_columns(utc_us(events["ts"]))  # naive instants are UTC
            .select(pl.col(c).cast(t) for c, t in self.schema.items())
            # Within one write as across writes, the last row of an (entity, event_id) wins.
            .unique(["entity_id", "event_id"], keep="last", maintain_order=True)
        )
        for chunk in _chunks(new["entity_id"].unique().sort().to_list()):
            arriving = new.filter(pl.col("entity_id").is_in(chunk))
            merged = (
                pl.concat([self._read(db, chunk), arriving])
                .unique(["entity_id", "event_id"], keep="last")
                # (entity_id, ts, event_id) is a total order, byte-wise as SQLite's was.
                .sort("entity_id", "ts", "event_id")
            )
            self._put(db, merged)

    def _delete(self, db: sqlite3.Connection, start: datetime, end: datetime) -> int:
        lo, hi = _us(start), _us(end)
        touched = [
            e
            for (e,) in db.execute(
                "SELECT entity_id FROM histories WHERE last_ts >= ? AND first_ts < ? "
                "ORDER BY entity_id",
                (lo, hi),
            )
        ]
        inside = pl.col("ts").dt.epoch("us").is_between(lo, hi, closed="left")
        deleted = 0
        for chunk in _chunks(touched):
            stored = self._read(db, chunk)
            removed = stored.filter(inside)
            # Histories that span the interval without an event in it stay as they are.
            hit = removed["entity_id"].unique().to_list()
            if not hit:
                continue
            deleted += removed.height
            db.executemany("DELETE FROM histories WHERE entity_id = ?", [(e,) for e in hit])
            self._put(db, stored.filter(pl.col("entity_id").is_in(hit) & ~inside))
        return deleted

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        events = self._read(self._connect(), [entity_id], None if before is None else [_us(before)])
        return events if limit is None else events.tail(int(limit))

    def histories(
        self, entity_ids: list[str], before: list[datetime | None] | None = None
    ) -> pl.DataFrame:
        """Every stored event of these entities (one read, for scoring a batch), ordered by
        entity and time, in the event table's schema. With `before` (one instant per entity id,
        which may repeat), only the events strictly before the latest instant given for their
        entity: a batch of decisions gets no event none of them can use."""
        if before is None:
            before = [None] * len(entity_ids)
        if len(before) != len(entity_ids):
            raise ValueError(f"{len(before)} instants given for {len(entity_ids)} entity ids")
        bound: dict[str, int] = {}
        for entity_id, ts in zip(entity_ids, before):
            us = _NO_BOUND if ts is None else _us(ts)
            bound[entity_id] = max(bound.get(entity_id, us), us)
        # Sorted in Python: code point order is UTF-8 byte order, the order Polars sorts in.
        asked = sorted(bound)
        return self._read(self._connect(), asked, [bound[e] for e in asked])

    def stats(self) -> dict:
        db = self._connect()
        n, entities, last = db.execute(
            "SELECT COALESCE(SUM(events), 0), COUNT(*), MAX(last_ts) FROM histories"
        ).fetchone()
        return {
            "events": n,
            "entities": entities,
            "latest_event": None
            if last is None
            else datetime.fromtimestamp(last / 1e6, UTC).isoformat(),
            "size_mb": round(self.path.stat().st_size / 2**20, 1),
        }

    # ------------------------------------------------------------ earlier layouts

    @staticmethod
    def _has_event_rows(db: sqlite3.Connection) -> bool:
        probe = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        return db.execute(probe).fetchone() is not None

    def _migrate_event_rows(self) -> None:
        """Stores written before the packed layout hold one row per event in `events`: their
        events are packed per entity and the table dropped, once (a second writer opening the
        store meanwhile waits on the write lock, up to the connection's timeout, then finds
        nothing left to do). Bentos built before this layout read `events`: rebuild them."""
        if not self._has_event_rows(self._connect()):
            return
        names = ", ".join(f'"{c}"' for c in self.schema)
        read_schema = {c: (pl.Int64 if c == "ts" else t) for c, t in self.schema.items()}
        with self._writing() as db:
            if not self._has_event_rows(db):
                return
            entity_ids = [e for (e,) in db.execute("SELECT DISTINCT entity_id FROM events")]
            for chunk in _chunks(sorted(entity_ids)):
                marks = ", ".join("?" for _ in chunk)
                rows = db.execute(
                    f"SELECT {names} FROM events WHERE entity_id IN ({marks})", chunk
                ).fetchall()
                columns = zip(*rows) if rows else ([] for _ in read_schema)
                frame = pl.DataFrame(
                    [pl.Series(c, v, dtype=t) for (c, t), v in zip(read_schema.items(), columns)]
                ).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
                self._put(db, frame.sort("entity_id", "ts", "event_id"))
            db.execute("DROP TABLE events")
        try:  # give the row table's pages back to the file system; SQLite reuses them otherwise
            self._connect().execute("VACUUM")
        except sqlite3.OperationalError:  # another connection is busy: the converted store is fine
            pass
