"""raw_events and event_rejects as Delta tables: atomic day partitions, checks, failure safety."""

import dagster as dg
import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake

from ml_assets.ingest import ingest
from resources.delta import write_days
from resources.sources import EventSource


def run(assets_resources, instance, *, partition=None, tags=None, raise_on_error=True, config=None):
    return dg.materialize(
        [ingest],
        resources=assets_resources,
        run_config={"ops": {"ingest": {"config": config}}} if config else None,
        partition_key=partition,
        tags=tags or {},
        instance=instance,
        raise_on_error=raise_on_error,
    )


def read(tables, name) -> pl.DataFrame:
    return tables.scan(name).collect().sort("event_id")


@pytest.fixture
def ingested(tables, small_world, instance, range_tags, resources_for):
    """Six weeks in one run: long enough for the volume check to have a baseline."""
    return run(
        resources_for(tables, small_world), instance, tags=range_tags("2025-01-01", "2025-02-11")
    )


def test_a_range_of_days_is_ingested_in_one_run_with_every_row_accounted_for(ingested, tables):
    events, rejects = read(tables, "raw_events"), read(tables, "event_rejects")
    assert events["day"].n_unique() == 42 and events.height > 1000
    assert rejects.height > 0
    assert rejects["source"].str.starts_with("simulator/").all()
    mat = ingested.asset_materializations_for_node("ingest")
    meta = {m.asset_key.to_user_string(): m.metadata for m in mat}
    assert meta["event_rejects"]["rows_in"].value == events.height + rejects.height
    checks = {c.check_name: c.passed for c in ingested.get_asset_check_evaluations()}
    assert checks == dict.fromkeys(checks, True) and len(checks) == 6
    volume = next(
        c for c in ingested.get_asset_check_evaluations() if c.check_name == "daily_volume"
    )
    assert volume.metadata["days_judged"].value > 0


def test_rematerializing_a_day_replaces_it_without_duplicates(
    ingested, tables, small_world, instance, resources_for
):
    before = read(tables, "raw_events")
    version = tables.version("raw_events")
    run(resources_for(tables, small_world), instance, partition="2025-01-05")
    after = read(tables, "raw_events")
    assert after.equals(before)
    assert tables.version("raw_events") == version + 1


def test_day_by_day_runs_build_the_same_tables_as_one_range_run(
    ingested, tables, small_world, instance, tmp_path, resources_for
):
    from resources.delta import DeltaTables

    daily = DeltaTables(root_uri=str(tmp_path / "daily"))
    days = [f"2025-02-{day:02d}" for day in range(1, 5)]
    for day in days:
        run(resources_for(daily, small_world), instance, partition=day)

    def those_days(t, name):
        return read(t, name).filter(pl.col("day").cast(pl.String).is_in(days))

    assert read(daily, "raw_events").equals(those_days(tables, "raw_events"))
    assert read(daily, "event_rejects").equals(those_days(tables, "event_rejects"))


def test_a_failed_run_leaves_the_previous_version_readable(
    ingested, tables, instance, tmp_path, resources_for
):
    before = read(tables, "raw_events")
    version = tables.version("raw_events")
    nowhere = tmp_path / "nowhere"
    broken = EventSource(kind="landing", landing_dir=str(nowhere), pack=str(nowhere / "pack.yaml"))
    result = run(
        resources_for(tables, broken), instance, partition="2025-01-03", raise_on_error=False
    )
    assert not result.success
    assert tables.version("raw_events") == version
    assert read(tables, "raw_events").equals(before)


def test_a_day_that_would_lose_rows_is_refused_unless_the_run_says_so(
    ingested, tables, small_world, instance, resources_for
):
    before = read(tables, "raw_events"), read(tables, "event_rejects")
    smaller = EventSource(**{**small_world.model_dump(), "n_users": small_world.n_users // 4})
    refused = run(
        resources_for(tables, smaller), instance, partition="2025-01-05", raise_on_error=False
    )
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure)
    assert (
        "fewer rows than the table holds (2025-01-05: " in failure.step_failure_data.error.message
    )
    assert read(tables, "raw_events").equals(before[0]) and read(tables, "event_rejects").equals(
        before[1]
    )

    knowingly = run(resources_for(tables, smaller), instance, partition="2025-01-05",
                    config={"allow_shrinking_days": True})  # fmt: skip
    shrinks = next(
        c for c in knowingly.get_asset_check_evaluations() if c.check_name == "no_day_shrinks"
    )
    assert shrinks.passed and "replaced knowingly" in shrinks.description
    assert read(tables, "raw_events").height < before[0].height
    run(resources_for(tables, small_world), instance, partition="2025-01-05")  # as it was
    assert read(tables, "raw_events").equals(before[0])


def test_a_run_killed_between_the_two_commits_leaves_readers_the_previous_pair(ingested, tables):
    """The rejects are committed first and raw_events' commit names their version: a run that
    died after the first commit is invisible in both tables; once both are in, both show."""
    from datetime import timedelta

    raw, rejected = read(tables, "raw_events"), read(tables, "event_rejects")
    day = rejected["day"].sort()[0]
    new_rejects = rejected.filter(pl.col("day") == day).with_columns(
        pl.lit("replayed").alias("reason")
    )
    write_days(
        tables.uri("event_rejects"), new_rejects, "day", day, day + timedelta(days=1)
    )  # then killed
    assert read(tables, "event_rejects").equals(rejected)
    assert read(tables, "raw_events").equals(raw)

    tables.write_days_together("raw_events", raw.filter(pl.col("day") == day), "event_rejects",
                               new_rejects, "day", day, day + timedelta(days=1))  # fmt: skip
    after = read(tables, "event_rejects")
    assert after.filter(pl.col("day") == day)["reason"].unique().to_list() == ["replayed"]
    assert after.filter(pl.col("day") != day).equals(rejected.filter(pl.col("day") != day))


def test_a_write_that_dies_midway_commits_nothing(tmp_path):
    uri = str(tmp_path / "t")
    write_deltalake(uri, pl.DataFrame({"day": ["a"], "x": [1]}).to_arrow())
    good = pl.read_delta(uri)
    schema = pl.DataFrame({"day": ["a"], "x": [1]}).to_arrow().schema

    def batches():
        yield pl.DataFrame({"day": ["a"], "x": [2]}).to_arrow().to_batches()[0]
        raise RuntimeError("disk full")

    import pyarrow as pa

    with pytest.raises(Exception, match="disk full"):
        write_deltalake(uri, pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite")
    assert DeltaTable(uri).version() == 0
    assert pl.read_delta(uri).equals(good)
