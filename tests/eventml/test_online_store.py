"""The online store returns exactly the history the offline tables hold."""

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
    assert store.history("nobody").height == 0 and store.history("nobody").schema == pl.Schema(SPEC.event_schema())


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
