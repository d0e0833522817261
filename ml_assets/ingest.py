"""Group `ingest`: the pack's reference tables, validated events per day, and every row that
failed the contract.

The two daily tables are written together (`DeltaTables.write_days_together`): readers see a
run's days in both or in neither. A landing file that cannot be read is quarantined, not
ingested, and named in the run's metadata and in the `landing_files` table. Every event takes
the reference tables' columns as of its time (`eventml.references`) before it is stored.
"""

from datetime import date, timedelta

import dagster as dg
import polars as pl

from eventml.landing import manifest
from eventml.quality import check_events, check_no_day_shrinks
from eventml.references import attach, validate_reference
from eventml.sources import DAY
from ml_assets.metadata import check_result, counts_md, table_md
from ml_assets.partitions import PARTITION_DAYS, daily, run_days
from resources.delta import ConcurrentWriteError, DeltaTables
from resources.sources import EventSource

RAW_EVENT_CHECKS = (
    "schema",
    "required_fields_not_null",
    "unique_event_ids",
    "daily_volume",
    "reject_rate",
    "no_day_shrinks",
)


class IngestConfig(dg.Config):
    # Replace days even where they would hold fewer rows than before (a source that really
    # withdrew rows); by default such a run fails and writes nothing.
    allow_shrinking_days: bool = False


REFERENCE_REJECTS = "reference_rejects"


def reference_table(name: str) -> str:
    return f"reference_{name}"


def stored_references(tables: DeltaTables, spec) -> dict[str, pl.DataFrame]:
    """The pack's reference tables as the `references` asset last wrote them (absent: never)."""
    found = {r.name: tables.scan(reference_table(r.name)) for r in spec.references}
    return {name: lazy.collect() for name, lazy in found.items() if lazy is not None}


@dg.asset(
    group_name="ingest",
    description="The pack's reference tables (a holder's profile, a shop's terms), each row "
    "holding from its valid_from on; rejected rows in reference_rejects.",
)
def references(context: dg.AssetExecutionContext, event_source: EventSource, tables: DeltaTables):
    spec, metadata, rejected = event_source.spec(), {}, []
    for ref in spec.references:
        rows, unreadable = event_source.reference_rows(ref)
        for name, why in unreadable.items():
            context.log.warning(f"reference {ref.name}: cannot read {name}: {why}")
        checked = validate_reference(rows.drop("source"), ref, spec, rows["source"])
        version = tables.overwrite(reference_table(ref.name), checked.clean)
        rejected.append(checked.rejects.with_columns(pl.lit(ref.name).alias("table")))
        metadata[ref.name] = dg.MetadataValue.json({
            "rows": checked.clean.height, "keys": checked.clean[ref.key].n_unique(),
            "rejected": checked.rejects.height, "delta_version": version,
            "rejects_by_reason": checked.reject_counts(), "unreadable_files": unreadable,
        })  # fmt: skip
    if rejected:
        tables.overwrite(REFERENCE_REJECTS, pl.concat(rejected, how="diagonal"))
    return dg.MaterializeResult(metadata={"tables": len(spec.references), **metadata})


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            group_name="ingest",
            description="Validated events of one day, one row per event (the event contract), "
            "with the reference tables' columns as of each event's time.",
            metadata={"partition_expr": DAY},
            deps=["references"],
        ),
        dg.AssetSpec(
            "event_rejects",
            group_name="ingest",
            description="Every row of the day that failed the contract, as delivered, with the reason.",
            metadata={"partition_expr": DAY},
        ),
    ],
    partitions_def=daily,
    # A backfill of many days is one run: the simulator steps its world once, not once per day.
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec(name, asset="raw_events", blocking=True) for name in RAW_EVENT_CHECKS
    ],
)
def ingest(
    context: dg.AssetExecutionContext, config: IngestConfig, event_source: EventSource,
    tables: DeltaTables,
):  # fmt: skip
    start, end = run_days(context)
    spec = event_source.spec()
    for arrival in event_source.admit(PARTITION_DAYS):
        if arrival.status == "quarantined":
            context.log.warning(f"quarantined {arrival.name}: {arrival.reason}")
    checked = event_source.validated_days(start, end, PARTITION_DAYS, tables)
    clean, rejects = checked.clean, checked.rejects
    refs = stored_references(tables, spec)
    if missing := [r.name for r in spec.references if r.name not in refs]:
        # Stored events keep what they were attached: null columns would be trained on.
        raise dg.Failure(
            f"the pack's reference tables {missing} were never materialized: materialize "
            "`references` first (it reads landing/references/<name>/; with no files yet, its "
            "tables are empty and the events' columns null)"
        )
    clean = attach(clean, refs, spec)
    context.log.info(
        f"{start}..{end - timedelta(days=1)}: {clean.height:,} clean rows, {rejects.height:,} rejected"
    )
    shrinks = check_no_day_shrinks(
        _rows_per_day(clean, rejects), _stored_rows_per_day(tables, start, end),
        allowed=config.allow_shrinking_days,
    )  # fmt: skip
    if not shrinks.passed:
        raise dg.Failure(description=shrinks.description, metadata=shrinks.figures)
    versions = tables.write_days_together("raw_events", clean, "event_rejects", rejects, DAY,
                                          start, end)  # fmt: skip
    quarantined = _record_landing_files(context, event_source, tables)

    yield dg.MaterializeResult(
        asset_key="event_rejects",
        metadata={
            "dagster/row_count": rejects.height,
            "delta_version": versions["event_rejects"],
            "rows_in": clean.height + rejects.height,
            "rejects_by_reason": counts_md(rejects, "reason"),
            "preview": table_md(rejects),
        },
    )
    yield dg.MaterializeResult(
        asset_key="raw_events",
        metadata={
            "dagster/row_count": clean.height,
            "delta_version": versions["raw_events"],
            "event_source": event_source.kind,
            "days": (end - start).days,
            "entities": clean["entity_id"].n_unique(),
            "event_type_mix": counts_md(clean, "event_type"),
            "preview": table_md(clean),
            **quarantined,
        },
    )
    outcomes = check_events(clean, rejects, spec, _prior_daily_counts(tables, start))
    for outcome in [*outcomes, shrinks]:
        yield check_result("raw_events", outcome)


def _rows_per_day(*frames: pl.DataFrame) -> dict[date, int]:
    counts = pl.concat([f.select(DAY) for f in frames]).group_by(DAY).len()
    return dict(counts.iter_rows())


def _stored_rows_per_day(tables: DeltaTables, start: date, end: date) -> dict[date, int]:
    """Rows in (clean + rejected) the tables hold now for the days [start, end)."""
    stored = [
        lazy.filter((pl.col(DAY) >= start) & (pl.col(DAY) < end)).select(DAY).collect()
        for lazy in (tables.scan("raw_events"), tables.scan("event_rejects"))
        if lazy is not None
    ]
    return _rows_per_day(*stored) if stored else {}


def _record_landing_files(context, event_source: EventSource, tables: DeltaTables) -> dict:
    """The landing zone's arrivals as the `landing_files` table; its quarantine as metadata."""
    if event_source.kind != "landing":
        return {}
    files = manifest(event_source.landing_path)
    try:
        tables.overwrite("landing_files", files)
    except ConcurrentWriteError:  # another ingest wrote the same log's manifest at once
        context.log.info("landing_files: another run rewrote it at the same moment")
    quarantined = files.filter(pl.col("status") == "quarantined").select("name", "reason")
    return {"quarantined_files": quarantined.height, "quarantine": table_md(quarantined, 50)}


def _prior_daily_counts(tables: DeltaTables, before, window_days: int = 28) -> dict:
    """Rows per day already stored for the days just before this run (the volume baseline)."""
    events = tables.scan("raw_events")
    if events is None:
        return {}
    since = before - timedelta(days=window_days)
    counts = (
        events.filter((pl.col(DAY) >= since) & (pl.col(DAY) < before)).group_by(DAY).len().collect()
    )
    return dict(counts.iter_rows())
