"""The online store: each entity's event history, for scoring one live request.

Serving computes features and sequences with the same functions as training, from the entity's
history, so the store keeps the events themselves (the feature set has all-history windows, so
no event can be dropped without keeping a running aggregate in its place). `OnlineStore` is the
interface; `open_store` picks the backend from where the store lives: a file path is the
embedded SQLite store (`sqlite`), a `redis://` URL its production counterpart (`redis`). Both
pack histories the same way (`packing`), answer every read the same and give the same scores
(Redis keeps a stream's newest writes as a short tail beside the packed history).

Layout: one value per entity, its whole history packed as one Arrow IPC stream, sorted by
(ts, event_id). Scoring reads histories, many at a time, far more often than days are
published, and a row per event cost a Python object per value on every read (a batch of 256
decisions reads ~30k events: ~100 ms as SQLite rows, ~15 ms as 256 packed histories). A write
or a delete re-packs only the entities it touches.

Keyed features (per terminal, per merchant) read another table: each key's activity per day
(`eventml.features.key_activity`), published with the same days as the events, in the same
transaction, so a request reads both as of the same publication. The pack's reference tables
(`eventml.references`) are held whole, packed per key, for attaching them to a request's
decision and recent events as ingest attached them to stored events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import polars as pl

from eventml.online_store.redis import RedisOnlineStore
from eventml.online_store.sqlite import SQLiteOnlineStore
from eventml.schema import DatasetSpec

__all__ = ["REDIS_SCHEMES", "OnlineStore", "RedisOnlineStore", "SQLiteOnlineStore", "open_store"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class OnlineStore(Protocol):
    location: str  # the file path or URL it was opened at

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
        """Every stored event of these entities (one read, for scoring a batch), ordered by
        entity and time, in the event table's schema. With `before` (one instant per entity id,
        which may repeat), only the events strictly before the latest instant given for their
        entity: a batch of decisions gets no event none of them can use."""

    def write_activity(self, activity: pl.DataFrame) -> int:
        """Insert or replace keys' activity rows (by key column, key, day and measure)."""

    def activity(self, keys: dict[str, list[str]]) -> pl.DataFrame:
        """Every stored activity row of these keys (key column → key values), in
        `ACTIVITY_SCHEMA`."""

    def write_references(self, name: str, rows: pl.DataFrame) -> int:
        """Replace reference table `name` with `rows` (its clean rows), atomically."""

    def references(self, name: str, keys: list[str]) -> pl.DataFrame | None:
        """The rows of reference table `name` of these keys (None: the store has none)."""

    def stats(self) -> dict:
        """Events, entities and the latest event's time, for the asset's metadata."""


def open_store(location: str, spec: DatasetSpec, *, convert: bool = True) -> OnlineStore:
    """The store at `location`: a `redis://` (or `rediss://`) URL, or a SQLite file path
    (`convert`: see `SQLiteOnlineStore`)."""
    if location.startswith(REDIS_SCHEMES):
        return RedisOnlineStore(location, spec)
    return SQLiteOnlineStore(location, spec, convert=convert)
