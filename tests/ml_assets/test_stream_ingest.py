"""The stream through Dagster: the stream sensor turns the days the consumer landed into ingest
runs once they are complete, and a streamed day is the same `raw_events` partition as the same
day ingested in batch; the stream's backlog and freshness are observed on the assets it feeds."""

import threading

import dagster as dg
import polars as pl
import pytest

from eventml.online_store import open_store
from eventml.stream import EventStream, StreamConsumer
from eventml.stream.landed import EVENTS, REJECTS
from eventml.stream.producer import publish_days, wait_until_taken
from eventml.worlds.lending import PACK, WorldConfig, iter_days, simulate
from ml_assets.ingest import ingest
from ml_assets.sensors import stream_sensor
from resources.delta import DeltaTables
from resources.sources import EventSource

USERS, DAYS = 200, 5  # 2025-01-01 .. 2025-01-05


@pytest.fixture
def streamed(tmp_path, redis_url, monkeypatch):
    """A world's first days published to the stream, with one bad event, and consumed."""
    monkeypatch.setenv("EVENTML_REDIS_URL", redis_url)
    monkeypatch.setenv("EVENTML_HOME", str(tmp_path / "home"))
    world = simulate(WorldConfig(n_users=USERS), range(DAYS))
    stream = EventStream(redis_url, PACK.name)
    bad = {**world.row(0, named=True), "event_id": "bad-type", "event_type": "??"}
    stream.publish([*world.sort("ts").to_dicts(), bad])
    tables = DeltaTables(root_uri=str(tmp_path / "stream_tables"))
    consumer = StreamConsumer(stream, PACK, open_store(redis_url, PACK), tables.uri(EVENTS),
                              tables.uri(REJECTS))  # fmt: skip
    while consumer.step(count=2_000, block_ms=10).entries:
        pass
    return world, stream, consumer, tables


def tick(instance, tables, cursor=None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"event_source": EventSource(kind="stream"), "tables": tables},
    )  # fmt: skip
    return stream_sensor(context)


def ingest_days(instance, source: EventSource, tables: DeltaTables, tags: dict) -> pl.DataFrame:
    resources = {"tables": tables, "io_manager": tables.io_manager(), "event_source": source}
    dg.materialize([ingest], resources=resources, instance=instance, tags=tags)
    return tables.scan("raw_events").collect().sort("event_id")


def test_complete_streamed_days_become_the_same_raw_events_as_in_batch(streamed, instance,
                                                                       tmp_path):  # fmt: skip
    world, stream, consumer, tables = streamed
    first = tick(instance, tables)
    # The last day is still open: its end is not yet behind the stream's newest event.
    [request] = first.run_requests
    assert (request.partition_key_range.start, request.partition_key_range.end) == (
        "2025-01-01",
        "2025-01-04",
    )
    assert request.tags["eventml/trigger"] == "stream"
    from_stream = ingest_days(instance, EventSource(kind="stream"), tables, request.tags)

    batch_tables = DeltaTables(root_uri=str(tmp_path / "batch_tables"))
    simulator = EventSource(n_users=USERS, fault_rate=0.0)
    from_batch = ingest_days(instance, simulator, batch_tables, request.tags)
    assert from_stream.height == world.filter(pl.col("ts").dt.day() <= 4).height
    assert from_stream.equals(from_batch)
    rejects = tables.scan("event_rejects").collect()
    assert rejects.select("event_id", "reason").rows() == [("bad-type", "unknown_event_type")]


def test_a_late_event_asks_for_its_day_again_and_the_stream_is_observed(streamed, instance):
    world, stream, consumer, tables = streamed
    first = tick(instance, tables)
    assert tick(instance, tables, first.cursor).run_requests == []

    late = {**world.filter(pl.col("ts").dt.day() == 2).row(0, named=True), "event_id": "late-1"}
    stream.publish([late])
    consumer.step(block_ms=10)
    again = tick(instance, tables, first.cursor)
    assert [(r.partition_key_range.start, r.partition_key_range.end)
            for r in again.run_requests] == [("2025-01-02", "2025-01-02")]  # fmt: skip

    observed = {e.asset_key.to_user_string(): e.metadata for e in again.asset_events}
    store = {k: v.value if hasattr(v, "value") else v for k, v in observed["online_store"].items()}
    assert store["stream_lag"] == 0 and store["stream_pending"] == 0
    assert store["consumer-1.freshness_p50_ms"] > 0
    assert store["consumer-1.watermark"].startswith("2025-01-05")
    raw = {k: v.value if hasattr(v, "value") else v for k, v in observed["raw_events"].items()}
    assert raw["stream_complete_through"] == "2025-01-04"


def test_the_sensor_waits_unless_the_source_is_the_stream(instance, tmp_path):
    context = dg.build_sensor_context(
        instance=instance,
        resources={"event_source": EventSource(), "tables": DeltaTables(root_uri=str(tmp_path))},
    )
    assert isinstance(stream_sensor(context), dg.SkipReason)


def test_published_days_are_waited_for_until_a_consumer_has_landed_them(tmp_path, redis_url):
    """What `make advance` does on the stream: publish the days, wait until they are landed."""
    stream = EventStream(redis_url, PACK.name)
    tables = DeltaTables(root_uri=str(tmp_path / "tables"))
    consumer = StreamConsumer(stream, PACK, open_store(redis_url, PACK), tables.uri(EVENTS),
                              tables.uri(REJECTS))  # fmt: skip
    config = WorldConfig(n_users=USERS)
    published = publish_days(stream, iter_days(config, range(2)), seconds_per_day=0)
    taking = threading.Thread(target=lambda: [consumer.step(block_ms=10) for _ in range(50)])
    taking.start()
    wait_until_taken(stream, timeout=60)
    assert tables.scan(EVENTS).collect().height == published
    taking.join()


def test_a_stream_that_never_refused_an_event_ingests_with_no_rejects(tmp_path, redis_url,
                                                                       instance, range_tags):  # fmt: skip
    stream = EventStream(redis_url, PACK.name)
    tables = DeltaTables(root_uri=str(tmp_path / "tables"))
    consumer = StreamConsumer(stream, PACK, open_store(redis_url, PACK), tables.uri(EVENTS),
                              tables.uri(REJECTS))  # fmt: skip
    stream.publish(simulate(WorldConfig(n_users=USERS), range(2)).sort("ts").to_dicts())
    while consumer.step(block_ms=10).entries:
        pass
    events = ingest_days(instance, EventSource(kind="stream"), tables,
                         range_tags("2025-01-01", "2025-01-01"))  # fmt: skip
    assert events.height > 0 and tables.scan("event_rejects").collect().height == 0
