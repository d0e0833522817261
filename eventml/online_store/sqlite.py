"""The embedded online store: one SQLite file (WAL mode: readers never block the writer).

One row per entity holding its packed history (`packing`), with its first and last event time
to find the entities a deletion touches; each key's activity per day; each reference key's
packed rows.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from eventml.home import interprocess_lock
from eventml.online_store.packing import (
    activity_frame,
    activity_rows,
    arriving,
    chunks,
    day_number,
    inside,
    latest_bounds,
    merged,
    packed_histories,
    packed_references,
    unpacked,
    us,
)
from eventml.schema import DatasetSpec


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

    @property
    def location(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: durable at checkpoints, fast commits.
            db.execute("PRAGMA synchronous=NORMAL")
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

    def _put(self, db: sqlite3.Connection, frame: pl.DataFrame) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO histories (entity_id, events, first_ts, last_ts, packed) "
            "VALUES (?, ?, ?, ?, ?)",
            packed_histories(frame),
        )

    @staticmethod
    def _fetch(db: sqlite3.Connection, entity_ids: list[str]) -> dict[str, bytes]:
        """The packed histories of those of `entity_ids` the store has."""
        packed: dict[str, bytes] = {}
        for chunk in chunks(entity_ids):
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
        return unpacked(self._fetch(db, entity_ids), entity_ids, before, self._empty)

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
                span = (day_number(start.date()), day_number(end.date()))
                db.execute("DELETE FROM key_activity WHERE day >= ? AND day < ?", span)
                self._put_activity(db, activity)
        return deleted

    def write_activity(self, activity: pl.DataFrame) -> int:
        with self._writing() as db:
            self._put_activity(db, activity)
        return activity.height

    @staticmethod
    def _put_activity(db: sqlite3.Connection, activity: pl.DataFrame) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO key_activity VALUES (?, ?, ?, ?, ?)", activity_rows(activity)
        )

    def activity(self, keys: dict[str, list[str]]) -> pl.DataFrame:
        rows = []
        db = self._connect()
        for column, values in keys.items():
            for chunk in chunks(sorted({v for v in values if v is not None})):
                marks = ", ".join("?" for _ in chunk)
                rows += db.execute(
                    "SELECT key_column, key, day, measure, count FROM key_activity "
                    f"WHERE key_column = ? AND key IN ({marks})",
                    [column, *chunk],
                ).fetchall()
        return activity_frame(rows)

    def write_references(self, name: str, rows: pl.DataFrame) -> int:
        with self._writing() as db:
            self._put_references(db, name, rows)
        return rows.height

    @staticmethod
    def _put_references(db: sqlite3.Connection, name: str, rows: pl.DataFrame) -> None:
        db.execute("DELETE FROM reference_rows WHERE name = ?", (name,))
        db.executemany(
            "INSERT INTO reference_rows VALUES (?, ?, ?)",
            [(name, key, packed) for key, packed in packed_references(rows)],
        )

    def references(self, name: str, keys: list[str]) -> pl.DataFrame | None:
        db, frames = self._connect(), []
        for chunk in chunks(sorted({k for k in keys if k is not None})):
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
        new = arriving(events, self.schema)
        for chunk in chunks(new["entity_id"].unique().sort().to_list()):
            self._put(
                db, merged(self._read(db, chunk), new.filter(pl.col("entity_id").is_in(chunk)))
            )

    def _delete(self, db: sqlite3.Connection, start: datetime, end: datetime) -> int:
        touched = [
            e
            for (e,) in db.execute(
                "SELECT entity_id FROM histories WHERE last_ts >= ? AND first_ts < ? "
                "ORDER BY entity_id",
                (us(start), us(end)),
            )
        ]
        deleted = 0
        for chunk in chunks(touched):
            stored = self._read(db, chunk)
            removed = stored.filter(inside(start, end))
            # Histories that span the interval without an event in it stay as they are.
            hit = removed["entity_id"].unique().to_list()
            if not hit:
                continue
            deleted += removed.height
            db.executemany("DELETE FROM histories WHERE entity_id = ?", [(e,) for e in hit])
            self._put(db, stored.filter(pl.col("entity_id").is_in(hit) & ~inside(start, end)))
        return deleted

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        events = self._read(self._connect(), [entity_id], None if before is None else [us(before)])
        return events if limit is None else events.tail(int(limit))

    def histories(
        self, entity_ids: list[str], before: list[datetime | None] | None = None
    ) -> pl.DataFrame:
        asked, bounds = latest_bounds(entity_ids, before)
        return self._read(self._connect(), asked, bounds)

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
            for chunk in chunks(sorted(entity_ids)):
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
