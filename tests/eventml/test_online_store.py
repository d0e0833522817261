"""The online store returns exactly the history the offline tables hold, on the embedded SQLite
store and on Redis, its production counterpart: every test here runs on both, and a random
sequence of writes leaves both holding the same bytes."""

import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from eventml.features import ACTIVITY_SCHEMA
from eventml.online_store import RedisOnlineStore, SQLiteOnlineStore
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


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "redis":
        return RedisOnlineStore(request.getfixturevalue("redis_url"), SPEC)
    return SQLiteOnlineStore(tmp_path / "online.sqlite", SPEC)


def test_history_round_trips_exactly(store):
    written = pl.concat([events(30), events(5, "u2")])
    assert store.write(written) == written.height
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


def test_replacing_days_is_one_transaction_that_a_failure_leaves_undone(store):
    store.write(events(48))
    day_two = (T0 + timedelta(days=1), T0 + timedelta(days=2))
    republished = events(24, start=24).with_columns(pl.col("amount").fill_null(-1.0))
    assert store.replace_between(*day_two, republished) == 24
    assert store.history("u1").equals(pl.concat([events(24), republished]))

    broken = republished.with_columns(pl.lit("not a time").alias("ts"))
    with pytest.raises(TypeError):
        store.replace_between(*day_two, broken)
    # The delete that ran before the failing write was rolled back with it.
    assert store.history("u1").equals(pl.concat([events(24), republished]))


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


def test_writes_merge_into_each_entitys_history_in_time_order(store):
    # Days arrive out of order and an event is re-sent with new values: the history is the
    # union, sorted by time, with the latest version of each event.
    store.write(pl.concat([events(10, start=20), events(3, "u2")]))
    store.write(events(20))
    changed = events(1, start=5).with_columns(pl.lit(99.0).alias("amount"))
    store.write(changed)
    expected = events(30).with_columns(
        pl.when(pl.col("event_id") == "u1-5").then(99.0).otherwise(pl.col("amount")).alias("amount")
    )
    assert store.history("u1").equals(expected)
    assert store.history("u2").equals(events(3, "u2"))
    assert store.stats()["events"] == 33 and store.stats()["entities"] == 2


def test_a_history_written_event_by_event_reads_as_if_written_at_once(store):
    # A stream's pattern: many small writes to one entity, some repeating an event with new
    # values; reads in between and after see the merged history, and the counts are exact.
    for i in range(40):
        store.write(events(3, start=i).with_columns(pl.lit(float(i)).alias("amount")))
        if i % 7 == 0:
            assert store.history("u1").height == i + 3
    expected = events(42).with_columns(pl.Series("amount", [float(min(h, 39)) for h in range(42)]))
    assert store.history("u1").equals(expected)
    assert store.histories(["u1"], before=[T0 + timedelta(hours=10)]).equals(expected.head(10))
    assert store.stats()["events"] == 42 and store.history("u1").equals(expected)


def test_deleting_a_span_touches_only_the_events_inside_it(store):
    store.write(pl.concat([events(48), events(5, "u2", start=30), events(5, "u3", start=100)]))
    # hours 24..34 of u1, and all of u2 (hours 30..34); u3 (hours 100..104) is outside
    deleted = store.delete_between(T0 + timedelta(hours=24), T0 + timedelta(hours=35))
    assert deleted == 11 + 5
    assert store.history("u1").equals(pl.concat([events(24), events(13, start=35)]))
    assert store.history("u2").height == 0 and store.history("u3").equals(events(5, "u3", 100))
    assert store.stats()["entities"] == 2 and store.stats()["events"] == 42


def test_an_event_is_keyed_by_entity_and_event_id_within_a_write_as_across_writes(store):
    shared = events(2, "u1").with_columns(pl.lit("e").alias("event_id"))  # two rows, one id
    other = events(1, "u2").with_columns(pl.lit("e").alias("event_id"))
    store.write(pl.concat([shared, other]))
    assert store.history("u1").equals(shared.tail(1))  # within an entity, the last row wins
    assert store.history("u2").equals(other)  # another entity's event of the same id stays


def test_deleting_a_span_leaves_histories_without_events_in_it_untouched(tmp_path):
    # u1's history (hours 0..9 and 50..59) spans hours 20..21 without an event there; only u2
    # has events in them. A re-packed SQLite row would get a new rowid.
    store = SQLiteOnlineStore(tmp_path / "online.sqlite", SPEC)
    u1 = pl.concat([events(10), events(10, start=50)])
    store.write(pl.concat([u1, events(2, "u2", start=20), events(2, "u3", start=100)]))
    query = "SELECT rowid, packed FROM histories WHERE entity_id = 'u1'"
    before = store._connect().execute(query).fetchone()
    assert store.delete_between(T0 + timedelta(hours=20), T0 + timedelta(hours=22)) == 2
    assert store._connect().execute(query).fetchone() == before
    assert store.history("u1").equals(u1) and store.history("u2").height == 0


def test_a_store_of_event_rows_is_packed_once_and_reads_the_same(tmp_path):
    """Stores written before the packed layout (one SQLite row per event) are converted when a
    writer opens them; the service then reads exactly what the rows held."""
    path = tmp_path / "old.sqlite"
    written = pl.concat([events(30), events(5, "u2")])
    columns = {c: ("INTEGER" if c == "ts" else "REAL" if t == pl.Float64 else "TEXT")
               for c, t in SPEC.event_schema().items()}  # fmt: skip
    with sqlite3.connect(path) as db:  # the layout earlier versions wrote
        db.execute(
            f"CREATE TABLE events ({', '.join(f'{c} {t}' for c, t in columns.items())}, "
            "PRIMARY KEY (event_id))"
        )
        db.execute("CREATE INDEX by_entity_time ON events (entity_id, ts)")
        rows = written.with_columns(pl.col("ts").dt.epoch("us")).rows()
        db.executemany(f"INSERT INTO events VALUES ({', '.join('?' for _ in columns)})", rows)
    # A serving worker does not convert (it could wait on the write lock for the whole job).
    with pytest.raises(RuntimeError, match="materialize the online_store asset"):
        SQLiteOnlineStore(path, SPEC, convert=False)
    with sqlite3.connect(path) as db:  # and it refused before writing anything
        assert "histories" not in {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    reopened = SQLiteOnlineStore(path, SPEC)
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "events" not in tables and "by_entity_time" not in tables
    assert reopened.history("u1").equals(events(30))
    assert reopened.histories(["u1"], before=[T0 + timedelta(hours=7)]).equals(events(7))
    assert reopened.stats()["events"] == 35
    assert SQLiteOnlineStore(path, SPEC).history("u2").equals(events(5, "u2"))  # nothing to redo
    assert SQLiteOnlineStore(path, SPEC, convert=False).history("u2").equals(events(5, "u2"))


def activity(day: int, key: str = "m1", count: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {"key_column": ["mc"], "key": [key], "day": [T0.date() + timedelta(days=day)],
         "measure": ["n_a"], "count": [count]},
        schema=ACTIVITY_SCHEMA,
    )  # fmt: skip


def test_keys_activity_is_republished_with_its_days(store):
    day = timedelta(days=1)
    store.replace_between(T0, T0 + 2 * day, events(48), pl.concat([activity(0), activity(1)]))
    store.write_activity(activity(0, key="m2", count=1))
    # Day two again, with other counts: day one's rows stay, day two's are replaced.
    store.replace_between(T0 + day, T0 + 2 * day, events(24, start=24), activity(1, count=7))
    got = store.activity({"mc": ["m1", "m2", None]}).sort("key", "day")
    expected = pl.concat([activity(0), activity(1, count=7), activity(0, key="m2", count=1)])
    assert got.equals(expected)
    assert store.activity({"mc": ["m9"]}).height == 0


def shops(*rows: tuple[str, int, str]) -> pl.DataFrame:
    """Reference rows (key first, as `reference_schema` orders them): shop, window, valid_from."""
    return pl.DataFrame(
        rows, schema={"mc": pl.String, "term": pl.Float64, "valid_from": pl.String}, orient="row"
    )


def test_a_reference_table_is_replaced_whole_and_read_by_key(store):
    store.write_references("shops", shops(("m1", 14, "2025-01-01"), ("m1", 30, "2025-03-01"),
                                          ("m2", 7, "2025-01-01")))  # fmt: skip
    assert store.references("shops", ["m1", None, "m9"]).equals(
        shops(("m1", 14, "2025-01-01"), ("m1", 30, "2025-03-01"))
    )
    store.replace_between(
        T0, T0 + timedelta(days=1), events(5), references={"shops": shops(("m2", 9, "2025-02-01"))}
    )
    assert store.references("shops", ["m1"]) is None
    assert store.references("shops", ["m2"]).equals(shops(("m2", 9, "2025-02-01")))
    assert store.references("holders", ["m2"]) is None


def test_the_same_writes_leave_both_backends_holding_the_same(tmp_path, redis_url):
    """A random sequence of writes, deletes and re-published days, with keys' activity and a
    reference table, applied to both stores: every read answers the same."""
    import random

    rng = random.Random(7)
    sqlite, redis = (
        SQLiteOnlineStore(tmp_path / "online.sqlite", SPEC),
        RedisOnlineStore(redis_url, SPEC),
    )
    entities = [f"u{i}" for i in range(12)]
    for step in range(25):
        entity, start, n = rng.choice(entities), rng.randrange(0, 200), rng.randrange(1, 40)
        day, span = T0 + timedelta(days=rng.randrange(0, 8)), timedelta(days=rng.randrange(1, 3))
        for store in (sqlite, redis):
            if step % 5 == 4:
                store.delete_between(day, day + span)
            elif step % 3 == 2:
                store.replace_between(
                    day, day + timedelta(days=1), events(n, entity, start),
                    pl.concat([activity((day - T0).days, key=f"m{k}", count=step) for k in range(3)]),
                    {"shops": shops((f"m{step % 3}", step, "2025-01-01"))},
                )  # fmt: skip
            else:
                store.write(events(n, entity, start))
    everyone = [*entities, "nobody"]
    bounds = [T0 + timedelta(hours=rng.randrange(0, 300)) for _ in everyone]
    assert redis.histories(everyone).equals(sqlite.histories(everyone))
    assert redis.histories(everyone, bounds).equals(sqlite.histories(everyone, bounds))
    assert all(redis.history(e, limit=7).equals(sqlite.history(e, limit=7)) for e in everyone)
    keys = {"mc": ["m0", "m1", "m2", "m3"]}
    order = ["key_column", "key", "day", "measure"]
    assert redis.activity(keys).sort(order).equals(sqlite.activity(keys).sort(order))
    assert redis.references("shops", ["m0", "m1", "m2"]).equals(
        sqlite.references("shops", ["m0", "m1", "m2"])
    )
    assert {k: v for k, v in redis.stats().items() if k != "size_mb"} == {
        k: v for k, v in sqlite.stats().items() if k != "size_mb"
    }


def test_a_redis_store_of_another_key_layout_is_refused_with_what_to_do(redis_url):
    store = RedisOnlineStore(redis_url, SPEC)
    store.client.set(f"{store.prefix}:layout", "9")
    with pytest.raises(ValueError, match="key layout 9.*rebuild risk_service_bento"):
        RedisOnlineStore(redis_url, SPEC)


def test_each_entitys_packed_slice_reads_back_as_its_events_alone():
    """A batch's histories are packed by slicing one Arrow table: each slice, entities of one
    event, of several, and with nulls, reads back as exactly that entity's events."""
    from eventml.online_store.packing import packed_histories, us

    frame = pl.concat([events(7, "u1"), events(1, "u2"), events(12, "u3")]).sort(
        "entity_id", "ts", "event_id"
    )
    packed = packed_histories(frame)
    assert [row[0] for row in packed] == ["u1", "u2", "u3"]
    for entity_id, n, first, last, history in packed:
        own = frame.filter(pl.col("entity_id") == entity_id)
        assert pl.read_ipc_stream(history).equals(own) and n == own.height
        assert (first, last) == (us(own["ts"].min()), us(own["ts"].max()))
