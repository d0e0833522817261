"""The stream consumer's first-copy rule, on a real Redis: the first entry of an event id is the
event; a later entry with the same id, in the same batch or a later one, on any day, is a
`duplicate_event_id` reject; and a batch delivered again (a consumer killed before it
acknowledged) holds the first copies it held before, and nothing of it lands twice."""

import polars as pl
import pytest

from eventml.online_store import open_store
from eventml.stream import EventStream, StreamConsumer
from eventml.worlds.lending import PACK, WorldConfig, simulate


@pytest.fixture
def world() -> list[dict]:
    events = simulate(WorldConfig(n_users=200), range(10)).sort("ts")
    assert events["ts"].dt.date().n_unique() == 10  # the copies below span several days
    return events.to_dicts()


def consumer_on(redis_url: str, tmp_path) -> StreamConsumer:
    return StreamConsumer(EventStream(redis_url, PACK.name), PACK, open_store(redis_url, PACK),
                          str(tmp_path / "events"), str(tmp_path / "rejects"))  # fmt: skip


def test_later_copies_of_an_event_id_are_rejects_and_a_redelivered_batch_is_not(
    world, redis_url, tmp_path
):
    consumer = consumer_on(redis_url, tmp_path)
    head, tail = world[:60], world[60:]
    again = head[::7] + tail[::5]  # copies of earlier batches' events and of this batch's own
    consumer.stream.publish(head)
    first = consumer.step(count=len(head) + 1, block_ms=10)  # not full: nothing read ahead
    consumer.stream.publish(tail + again)
    entries = consumer.stream.read(consumer.name, count=len(tail) + len(again))
    second = consumer.consume(entries)
    redelivered = consumer.consume(entries)  # as a restarted consumer's pending batch

    assert (first.clean, first.rejected) == (len(head), 0)
    assert (second.clean, second.rejected) == (len(tail), len(again))
    assert (redelivered.clean, redelivered.rejected) == (len(tail), len(again))
    assert redelivered.landed == 0
    landed = pl.read_delta(str(tmp_path / "events"))
    rejects = pl.read_delta(str(tmp_path / "rejects"))
    assert sorted(landed["event_id"]) == sorted(e["event_id"] for e in world)
    assert sorted(rejects["event_id"]) == sorted(e["event_id"] for e in again)
    assert set(rejects["reason"]) == {"duplicate_event_id"}


def test_a_producer_that_orders_its_fields_at_random_is_read_the_same(world, redis_url):
    """A producer writing each event's fields in its own order (a map's iteration) gives the
    same columns as one that keeps an order."""
    import random

    ordered, shuffled = EventStream(redis_url, "ordered"), EventStream(redis_url, "shuffled")
    rng = random.Random(0)
    mixed = [dict(rng.sample(list(event.items()), len(event))) for event in world]
    for stream, events in ((ordered, world), (shuffled, mixed)):
        stream.create_group()
        stream.publish(events)
    a = ordered.read("c", count=len(world)).drop("__entry")
    b = shuffled.read("c", count=len(world)).drop("__entry")
    assert b.select(a.columns).equals(a)
