"""The online store: each entity's event history, for scoring one live request.

Serving computes features and sequences with the same functions as training, from the entity's
history, so the store keeps the events themselves (the feature set has all-history windows, so
no event can be dropped without keeping a running aggregate in its place). `OnlineStore` is the
interface; `SQLiteOnlineStore` is the embedded default (WAL mode: readers never block the
writer); a Redis backend would keep one sorted set per entity behind the same three methods.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import polars as pl

from eventml.schema import DatasetSpec

_SQL_TYPE = {pl.String(): "TEXT", pl.Float64(): "REAL"}
_NO_BOUND = 2**63 - 1  # µs after every datetime Python can hold: no bound


class OnlineStore(Protocol):
    def write(self, events: pl.DataFrame) -> int:
        """Insert or replace events (by event_id); returns rows written."""

    def delete_between(self, start: datetime, end: datetime) -> int:
        """Remove events with start <= ts < end (before re-publishing those days)."""

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        """The entity's events strictly before `before` (all if None), oldest first, at most the
        last `limit` of them, in the event table's schema."""


def _us(ts: datetime) -> int:
    return (
        int(ts.timestamp() * 1_000_000)
        if ts.tzinfo
        else int(ts.replace(tzinfo=UTC).timestamp() * 1_000_000)
    )


class SQLiteOnlineStore:
    def __init__(self, path: str | Path, spec: DatasetSpec):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = spec.event_schema()
        self._local = threading.local()  # one connection per thread: sqlite3 objects are not shared
        columns = ", ".join(
            f'"{c}" {"INTEGER" if c == "ts" else _SQL_TYPE[t]}' for c, t in self.schema.items()
        )
        with self._connect() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS events ({columns}, PRIMARY KEY (event_id))")
            # Covering: an entity's history is one contiguous run of this index, read without a
            # lookup into the table per event (a batch of 256 entities reads ~30k events, and those
            # lookups were most of its SQL time). It replaces the (entity_id, ts) index of stores
            # written before it, whose every query it serves.
            key = ("entity_id", "ts", "event_id")
            indexed = ", ".join(f'"{c}"' for c in (*key, *(c for c in self.schema if c not in key)))
            db.execute(f"CREATE INDEX IF NOT EXISTS by_entity_history ON events ({indexed})")
            db.execute("DROP INDEX IF EXISTS by_entity_time")
            db.execute("CREATE INDEX IF NOT EXISTS by_time ON events (ts)")

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

    def write(self, events: pl.DataFrame) -> int:
        if events.height == 0:
            return 0
        rows = events.select(
            pl.col("ts").dt.epoch("us").alias("ts") if c == "ts" else pl.col(c) for c in self.schema
        ).rows()
        names = ", ".join(f'"{c}"' for c in self.schema)
        marks = ", ".join("?" for _ in self.schema)
        with self._connect() as db:  # one transaction: a day's events appear all at once
            db.executemany(f"INSERT OR REPLACE INTO events ({names}) VALUES ({marks})", rows)
        return len(rows)

    def delete_between(self, start: datetime, end: datetime) -> int:
        with self._connect() as db:
            return db.execute(
                "DELETE FROM events WHERE ts >= ? AND ts < ?", (_us(start), _us(end))
            ).rowcount

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        names = ", ".join(f'"{c}"' for c in self.schema)
        where, params = "entity_id = ?", [entity_id]
        if before is not None:
            where += " AND ts < ?"
            params.append(_us(before))
        # Newest first with a limit, then re-sorted: the last `limit` events, oldest first.
        sql = f"SELECT {names} FROM events WHERE {where} ORDER BY ts DESC, event_id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._connect().execute(sql, params).fetchall()
        read_schema = {c: (pl.Int64 if c == "ts" else t) for c, t in self.schema.items()}
        frame = pl.DataFrame(rows[::-1], schema=read_schema, orient="row")
        return frame.with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))

    def histories(
        self, entity_ids: list[str], before: list[datetime] | None = None
    ) -> pl.DataFrame:
        """Every stored event of these entities (one query, for scoring a batch), ordered by
        entity and time, in the event table's schema. With `before` (one instant per entity id,
        which may repeat), only the events strictly before the latest instant given for their
        entity: a batch of decisions reads no event none of them can use."""
        if before is None:
            before = [None] * len(entity_ids)
        if len(before) != len(entity_ids):
            raise ValueError(f"{len(before)} instants given for {len(entity_ids)} entity ids")
        bound: dict[str, int] = {}
        for entity_id, ts in zip(entity_ids, before):
            us = _NO_BOUND if ts is None else _us(ts)
            bound[entity_id] = max(bound.get(entity_id, us), us)
        names = ", ".join(f'e."{c}"' for c in self.schema)
        asked = sorted(bound.items())
        rows = []
        if asked:
            # A join with a VALUES table: SQLite walks the covering index once per entity and
            # stops at its bound; later events are neither read nor converted to Python.
            values = ", ".join("(?, ?)" for _ in asked)
            sql = (
                f"WITH asked(entity_id, before) AS (VALUES {values}) "
                f"SELECT {names} FROM asked JOIN events e "
                "ON e.entity_id = asked.entity_id AND e.ts < asked.before"
            )
            rows = self._connect().execute(sql, [v for pair in asked for v in pair]).fetchall()
        read_schema = {c: (pl.Int64 if c == "ts" else t) for c, t in self.schema.items()}
        # Built column by column (faster than from rows) and sorted here rather than by SQLite:
        # (entity_id, ts, event_id) is a total order, byte-wise in both.
        columns = zip(*rows) if rows else ([] for _ in read_schema)
        frame = pl.DataFrame(
            [pl.Series(c, v, dtype=t) for (c, t), v in zip(read_schema.items(), columns)]
        ).sort("entity_id", "ts", "event_id")
        return frame.with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))

    def stats(self) -> dict:
        db = self._connect()
        n, entities, last = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT entity_id), MAX(ts) FROM events"
        ).fetchone()
        return {
            "events": n,
            "entities": entities,
            "latest_event": None
            if last is None
            else datetime.fromtimestamp(last / 1e6, UTC).isoformat(),
            "size_mb": round(self.path.stat().st_size / 2**20, 1),
        }
