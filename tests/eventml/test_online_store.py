"""The online store returns exactly the history the offline tables hold."""

import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from eventml.online_store import SQLiteOnlineStore
from eventml.schema import DatasetSpec

SPEC = DatasetSpec.from_dict(
    {
        "name": "s",
        "source_start": "2025-01-01",
        "event_types": ["a", "b"],
        "categorical": ["mc"],
        "numeric": ["term"],
        "decision_event_types": ["a"],
    }
)
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def events(n: int, entity: str = "u1", start: int = 0) -> pl.DataFrame:
    ids = range(start, start + n)
    return pl.DataFrame(
        {
            "entity_id": [entity] * n,
            "event_id": [f"{entity}-{i}" for i in ids],
            "ts": [T0 + timedelta(hours=i) for i in ids],
            "event_type": ["a" if i % 2 else "b" for i in ids],
            "amount": [None if i % 3 == 0 else float(i) for i in ids],
            "mc": [None if i % 4 == 0 else f"m{i % 3}" for i in ids],
            "term": [float(i % 5) for i in ids],
        },
        schema=SPEC.event_schema(),
    )


@pytest.fixture
def store(tmp_path):
    return SQLiteOnlineStore(tmp_path / "online.sqlite", SPEC)


def test_history_round_trips_exactly(store):
    written = pl.concat([events(30), events(5, "u2")])
    store.write(written)
    assert store.history("u1").equals(events(30))
    assert store.history("nobody").height == 0 and store.history("nobody").schema == pl.Schema(
        SPEC.event_schema()
    )


def test_history_before_a_time_and_limited_to_the_last_events(store):
    store.write(events(30))
    cut = T0 + timedelta(hours=20)
    assert store.history("u1", before=cut).equals(events(20))
    assert store.history("u1", before=cut, limit=5).equals(events(20).tail(5))


def test_rewriting_a_day_replaces_it(store):
    store.write(events(48))
    store.delete_between(T0 + timedelta(days=1), T0 + timedelta(days=2))
    store.write(events(24, start=24))
    store.write(events(24, start=24))  # twice: idempotent by event_id
    assert store.history("u1").equals(events(48))
    assert store.stats()["events"] == 48


def test_readers_are_not_blocked_by_a_writer(store):
    store.write(events(10))
    seen = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            seen.append(store.history("u1").height)

    reader = threading.Thread(target=read)
    reader.start()
    for k in range(20):
        store.write(events(50, "u2", start=k * 50))
    stop.set()
    reader.join()
    assert seen and set(seen) == {10}


def test_histories_of_a_batch_equal_each_entitys_history(store):
    store.write(pl.concat([events(30), events(12, "u2"), events(5, "u3")]))
    got = store.histories(["u2", "u1", "u2", "nobody"])
    assert got.equals(pl.concat([events(30), events(12, "u2")]))
    assert store.histories([]).schema == pl.Schema(SPEC.event_schema())


def test_histories_stop_at_each_entitys_latest_instant(store):
    store.write(pl.concat([events(30), events(12, "u2")]))
    got = store.histories(
        ["u1", "u2", "u1"],
        before=[T0 + timedelta(hours=5), T0 + timedelta(hours=3), T0 + timedelta(hours=20)],
    )
    # u1's latest instant is hour 20 (the bound is per entity, the latest of its decisions)
    assert got.equals(pl.concat([events(20), events(3, "u2")]))
    with pytest.raises(ValueError, match="2 instants given for 1 entity ids"):
        store.histories(["u1"], before=[T0, T0])


def test_a_store_from_before_the_covering_index_gets_it_and_reads_the_same(tmp_path):
    path = tmp_path / "old.sqlite"
    SQLiteOnlineStore(path, SPEC).write(pl.concat([events(30), events(5, "u2")]))
    with sqlite3.connect(path) as db:  # the layout earlier versions wrote
        db.execute("DROP INDEX by_entity_history")
        db.execute("CREATE INDEX by_entity_time ON events (entity_id, ts)")
    reopened = SQLiteOnlineStore(path, SPEC)
    with sqlite3.connect(path) as db:
        indexes = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert "by_entity_history" in indexes and "by_entity_time" not in indexes
    assert reopened.history("u1").equals(events(30))
    assert reopened.histories(["u1"], before=[T0 + timedelta(hours=7)]).equals(events(7))
