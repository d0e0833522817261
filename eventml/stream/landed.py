"""What the stream consumer landed, read back by day: the `stream` event source of `raw_events`.

The consumer validated every entry against the pack's contract and placed it on a partition day
(`eventml.stream.consumer`), so a day of the stream is the two tables' rows of that day, as
`eventml.sources.ingest_days` gives a day of a file or of the simulator. A day is *complete* once
the stream's event time (its watermark, the newest event landed) is `lateness` past the day's
end: events arrive in about time order, and one arriving later still lands and changes the day's
count, which asks for the day again (`ml_assets.sensors.stream_sensor`).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from eventml.schema import DatasetSpec
from eventml.sources import DAY
from eventml.validation import Validated

EVENTS, REJECTS = "stream_events", "stream_rejects"


def landed_table(uri: str) -> DeltaTable | None:
    """The Delta table at `uri`, or None before the consumer's first commit to it."""
    try:
        return DeltaTable(uri)
    except TableNotFoundError:
        return None


def landed_days(events_uri: str, rejects_uri: str, start: date, end: date,
                spec: DatasetSpec) -> Validated:  # fmt: skip
    """The clean events and the rejects the consumer landed on the days [start, end)."""
    events, rejects = landed_table(events_uri), landed_table(rejects_uri)
    if events is None:
        raise ValueError(
            f"the stream has landed nothing yet ({events_uri} does not exist): start the "
            "consumer (`make stream`) and publish events before ingesting the stream"
        )
    on_days = pl.col(DAY).is_between(start, end, closed="left")
    clean = pl.scan_delta(events).filter(on_days).collect()
    if rejects is None:  # no entry was ever refused: the table is written with its first reject
        text = dict.fromkeys([*spec.event_schema(), "reason", "field", "source"], pl.String)
        return Validated(clean=clean, rejects=pl.DataFrame(schema={**text, DAY: pl.Date}))
    return Validated(clean=clean, rejects=pl.scan_delta(rejects).filter(on_days).collect())


def watermark(events_uri: str) -> datetime | None:
    """The newest event time landed (None: nothing yet)."""
    table = landed_table(events_uri)
    return (
        None if table is None else pl.scan_delta(table).select(pl.col("ts").max()).collect().item()
    )


def complete_day_counts(events_uri: str, rejects_uri: str, lateness: timedelta) -> dict[date, int]:
    """Rows landed (clean + rejected) per day, for the days complete at the watermark."""
    newest = watermark(events_uri)
    if newest is None:
        return {}
    before = (newest - lateness).date()  # days ending at or before newest - lateness
    counts: dict[date, int] = {}
    for uri in (events_uri, rejects_uri):
        if (table := landed_table(uri)) is None:
            continue
        per_day = pl.scan_delta(table).filter(pl.col(DAY) < before).group_by(DAY).len().collect()
        for day, rows in per_day.iter_rows():
            counts[day] = counts.get(day, 0) + rows
    return counts
