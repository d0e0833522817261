"""The landing-zone sensor: each dropped file becomes one run for its days, once."""

import os

import dagster as dg
import pytest

from eventml.landing import arrivals
from ml_assets.ingest import ingest, references
from ml_assets.sensors import landing_zone_sensor, reference_files_sensor
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


REFERENCED = (
    SPEC
    + """numeric: [rating]
references: [{name: stores, key: store, columns: [rating]}]
"""
)


def test_a_change_to_the_reference_files_requests_one_references_run(zone, instance):
    (zone / "pack.yaml").write_text(REFERENCED)
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))

    def tick(cursor=None):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"event_source": source}
        )
        return reference_files_sensor(context)

    folder = zone / "references" / "stores"
    folder.mkdir(parents=True)
    (folder / "2025-01.csv").write_text("shop,valid_from,rating\nnorth,2025-01-01,4.5\n")
    first = tick()
    (request,) = first.run_requests
    assert request.run_key == first.cursor  # the files' digest: the same files never run twice
    assert isinstance(tick(first.cursor), dg.SkipReason)  # the same files: nothing to do
    (folder / "2025-02.csv").write_text("shop,valid_from,rating\nnorth,2025-02-01,3.0\n")
    second = tick(first.cursor)
    assert len(second.run_requests) == 1 and second.cursor != first.cursor


def test_days_are_not_ingested_before_the_reference_tables_exist(
    zone, tables, instance, range_tags
):
    """Stored events keep what they were attached: ingesting before the tables exist would
    store null columns that training would learn from, so the run refuses and says what to do."""
    (zone / "pack.yaml").write_text(REFERENCED)
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(zone / "pack.yaml"))
    resources = {"event_source": source, "tables": tables, "io_manager": tables.io_manager()}
    refused = dg.materialize([references, ingest], selection=["raw_events", "event_rejects"],
                             resources=resources, instance=instance,
                             tags=range_tags("2025-01-02", "2025-01-03"), raise_on_error=False)  # fmt: skip
    assert not refused.success
    (failure,) = [e for e in refused.all_events if e.is_step_failure]
    assert "materialize `references` first" in failure.step_failure_data.error.to_string()

    # With no reference file yet the table is empty: the days are ingested, the rating null (the
    # file's own bad rows fail a blocking check after the write; that is not this test's).
    made = dg.materialize([references, ingest], selection=["references"], resources=resources,
                          instance=instance)  # fmt: skip
    assert made.success
    dg.materialize([references, ingest], selection=["raw_events", "event_rejects"],
                   resources=resources, instance=instance,
                   tags=range_tags("2025-01-02", "2025-01-03"), raise_on_error=False)  # fmt: skip
    stored = tables.scan("raw_events").collect()
    assert stored.height == 2 and stored["rating"].is_null().all()
