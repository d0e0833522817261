"""Group `ingest`: validated events per day, and every row that failed the contract."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from eventml.quality import check_events
from eventml.sources import DAY, ingest_days
from ml_assets.metadata import check_result, counts_md, table_md
from ml_assets.partitions import daily, run_days
from resources.delta import DeltaTables
from resources.sources import EventSource

RAW_EVENT_CHECKS = (
    "schema",
    "required_fields_not_null",
    "unique_event_ids",
    "daily_volume",
    "reject_rate",
)


@dg.multi_asset(
    outs={
        "raw_events": dg.AssetOut(
            group_name="ingest",
            description="Validated events of one day, one row per event (the event contract).",
            metadata={"partition_expr": DAY},
        ),
        "event_rejects": dg.AssetOut(
            group_name="ingest",
            description="Every row of the day that failed the contract, as delivered, with the reason.",
            metadata={"partition_expr": DAY},
        ),
    },
    partitions_def=daily,
    # A backfill of many days is one run: the simulator steps its world once, not once per day.
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[
        dg.AssetCheckSpec(name, asset="raw_events", blocking=True) for name in RAW_EVENT_CHECKS
    ],
)
def ingest(context: dg.AssetExecutionContext, event_source: EventSource, tables: DeltaTables):
    start, end = run_days(context)
    spec = event_source.spec()
    raw = event_source.raw_rows(start, end)
    checked = ingest_days(raw, spec, start, end, now=datetime.now(UTC))
    clean, rejects = checked.clean, checked.rejects
    context.log.info(
        f"{start}..{end - timedelta(days=1)}: {clean.height:,} clean rows, {rejects.height:,} rejected"
    )

    yield dg.Output(
        clean,
        "raw_events",
        metadata={
            "dagster/row_count": clean.height,
            "days": (end - start).days,
            "entities": clean["entity_id"].n_unique(),
            "event_type_mix": counts_md(clean, "event_type"),
            "preview": table_md(clean),
        },
    )
    yield dg.Output(
        rejects,
        "event_rejects",
        metadata={
            "dagster/row_count": rejects.height,
            "rows_in": clean.height + rejects.height,
            "rejects_by_reason": counts_md(rejects, "reason"),
            "preview": table_md(rejects),
        },
    )
    for outcome in check_events(clean, rejects, spec, _prior_daily_counts(tables, start)):
        yield check_result("raw_events", outcome)


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
