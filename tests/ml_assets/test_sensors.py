"""The landing-zone sensor: each dropped file becomes one run for its days, once."""

import os

import dagster as dg
import pytest

from eventml.landing import arrivals
from ml_assets.ingest import ingest
from ml_assets.sensors import landing_zone_sensor
from resources.sources import EventSource

SPEC = """
name: shop_events
source_start: 2025-01-01
event_types: [visit, purchase, return]
categorical: [store]
decision_event_types: [purchase]
columns: {entity_id: customer_no, event_id: uid, ts: happened_at, event_type: action, amount: total, store: shop}
"""


@pytest.fixture
def zone(tmp_path):
    zone = tmp_path / "landing"
    zone.mkdir()
    (zone / "pack.yaml").write_text(SPEC)
    (zone / "day1.csv").write_text(
        "customer_no,uid,happened_at,action,total,shop\n"
        "c1,1,2025-01-02T10:00:00Z,visit,,north\n"
        "c1,2,2025-01-02T10:05:00Z,purchase,30.5,north\n"
        "c2,3,2025-01-03T09:00:00Z,purchase,-4,south\n"
        "c3,4,2025-01-03T09:30:00Z,levitate,1,south\n"
    )
    return zone


def evaluate(source, instance, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"event_source": source}
    )
    return landing_zone_sensor(context)


def test_each_file_is_requested_once_over_repeated_ticks(zone, instance):
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))
    first = evaluate(source, instance)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert (
        request.partition_key_range.start == "2025-01-02"
        and request.partition_key_range.end == "2025-01-03"
    )
    assert request.tags["eventml/file"] == "day1.csv"

    second = evaluate(source, instance, cursor=first.cursor)
    assert second.run_requests == []

    (zone / "day2.csv").write_text(
        "customer_no,uid,happened_at,action,total,shop\nc9,9,2025-01-05T00:00:00Z,visit,,east\n"
    )
    third = evaluate(source, instance, cursor=second.cursor)
    assert [r.tags["eventml/file"] for r in third.run_requests] == ["day2.csv"]


def test_a_rewritten_file_is_requested_again(zone, instance):
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))
    first = evaluate(source, instance)
    path = zone / "day1.csv"
    path.write_text(path.read_text() + "c4,5,2025-01-02T11:00:00Z,visit,,north\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    again = evaluate(source, instance, cursor=first.cursor)
    assert (
        len(again.run_requests) == 1
        and again.run_requests[0].run_key != first.run_requests[0].run_key
    )


def test_the_sensor_waits_while_the_source_is_the_simulator(instance):
    assert isinstance(evaluate(EventSource(), instance), dg.SkipReason)


def test_the_requested_run_ingests_the_mapped_file(zone, instance, tables, resources_for):
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))
    request = evaluate(source, instance).run_requests[0]
    result = dg.materialize(
        [ingest],
        resources=resources_for(tables, source),
        tags=request.tags,
        instance=instance,
        raise_on_error=False,
    )
    events = tables.scan("raw_events").collect().sort("event_id")
    rejects = tables.scan("event_rejects").collect().sort("event_id")
    assert events.select("entity_id", "event_id", "event_type", "amount").rows() == [
        ("c1", "1", "visit", None),
        ("c1", "2", "purchase", 30.5),
    ]
    assert events["store"].to_list() == ["north", "north"]
    assert dict(zip(rejects["event_id"], rejects["reason"])) == {
        "3": "negative_amount",
        "4": "unknown_event_type",
    }
    # Half the file was bad: the rows are kept, and the blocking check stops anything downstream.
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["reject_rate"] is False and not result.success


def test_an_unreadable_file_is_quarantined_and_a_good_file_after_it_still_runs(zone, instance):
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))
    (zone / "a_empty.csv").write_bytes(b"")
    (zone / "b_latin1.csv").write_bytes("customer_no,uid\nM\xfcller,1\n".encode("latin-1"))
    first = evaluate(source, instance)
    assert [r.tags["eventml/file"] for r in first.run_requests] == ["day1.csv"]
    (zone / "day3.csv").write_text(
        "customer_no,uid,happened_at,action,total,shop\nc8,8,2025-01-06T00:00:00Z,visit,,east\n"
    )
    later = evaluate(source, instance, cursor=first.cursor)
    assert [r.tags["eventml/file"] for r in later.run_requests] == ["day3.csv"]
    quarantined = {a.name: a.reason for a in arrivals(zone) if a.status == "quarantined"}
    assert quarantined.keys() == {"a_empty.csv", "b_latin1.csv"}
    assert "not UTF-8" in quarantined["b_latin1.csv"] and "empty" in quarantined["a_empty.csv"]
