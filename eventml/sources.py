"""Where raw rows come from, and how a run's days are cut out of them.

Two sources feed the same contract: the simulator (optionally with the faults a real feed has,
so the rejects path is exercised every day) and the landing zone's log of Parquet/CSV files in
the user's own columns (`eventml.landing`), mapped by a `DatasetSpec`. `ingest_days` validates
either and returns the clean events and the rejects of the requested days, each row tagged with
the partition `day` it is counted on.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import numpy as np
import polars as pl

from eventml.schema import DatasetSpec
from eventml.validation import Validated, parse_ts, validate

DAY = "day"  # the partition column of raw_events and event_rejects (a UTC date)


def midnight(day: date) -> datetime:
    """The instant a partition day starts (UTC): day d holds events in [midnight(d), midnight(d + 1))."""
    return datetime.combine(day, time(), UTC)


# ---------------------------------------------------------------- a run's days


def ingest_days(
    raw: pl.DataFrame,
    spec: DatasetSpec,
    start: date,
    end: date,
    now: datetime | None = None,
    partitions: tuple[date, date] | None = None,
) -> Validated:
    """Validate `raw` (canonical columns as text or typed, plus `source`) and keep the rows
    placed on the days [start, end), each with its `day`.

    All of `raw` is validated together so a duplicate is caught even across files. Every row is
    placed on exactly one day of `partitions` ([first, end) of all partition days), so it is
    counted once however the days are split into runs: a clean row on its own day (one outside
    the partitions is rejected as `outside_partitions`: there is no day to keep it on); a
    rejected row on its own day when that is a partition day, else on the first partition day
    its source has rows for (a timestamp that does not parse, or lies before the source's
    start, has no day of its own).
    """
    first, last = partitions or (date.min, date.max)
    source = raw["source"] if "source" in raw.columns else pl.Series(["unknown"] * raw.height)
    checked = validate(raw.drop("source", strict=False), spec, now, source, partitions)
    inside = (pl.col(DAY) >= first) & (pl.col(DAY) < last)
    clean = checked.clean.with_columns(pl.col("ts").dt.date().alias(DAY))
    rejects = checked.rejects.with_columns(
        parse_ts(pl.col("ts"), pl.String(), spec).dt.date().alias(DAY)
    )
    anchor = (
        raw.select(
            source.alias("source"),
            parse_ts(pl.col("ts"), raw.schema["ts"], spec).dt.date().alias("__anchor"),
        )
        .filter((pl.col("__anchor") >= first) & (pl.col("__anchor") < last))
        .group_by("source")
        .agg(pl.col("__anchor").min())
    )
    rejects = (
        rejects.join(anchor, on="source", how="left")
        .with_columns(pl.when(inside).then(pl.col(DAY)).otherwise("__anchor").alias(DAY))
        .drop("__anchor")
    )
    if unplaced := rejects.filter(pl.col(DAY).is_null())["source"].unique().to_list():
        raise ValueError(
            f"sources {unplaced[:5]} have no row inside the partitions {first}..{last}, so their "
            "rejects have no day to be counted on (the landing zone quarantines such files)"
        )
    in_run = (pl.col(DAY) >= start) & (pl.col(DAY) < end)
    return Validated(clean=clean.filter(in_run), rejects=rejects.filter(in_run))


# ---------------------------------------------------------------- a realistic feed


FAULTS = (
    "missing_entity_id",
    "unparseable_ts",
    "unknown_event_type",
    "negative_amount",
    "duplicate_event_id",
)


def inject_faults(events: pl.DataFrame, rate: float, seed: int) -> pl.DataFrame:
    """The same events as text, with about `rate` of them broken the ways real feeds break (one
    fault per broken row, drawn from FAULTS). Deterministic for a given frame and seed."""
    text = events.with_columns(pl.all().cast(pl.String))
    if rate <= 0 or events.height == 0:
        return text
    rng = np.random.default_rng(seed)
    broken = rng.random(events.height) < rate
    kind = rng.integers(0, len(FAULTS), events.height)
    fault = pl.Series("__fault", np.where(broken, np.array(FAULTS)[kind], ""))
    text = text.with_columns(fault)
    is_ = pl.col("__fault").__eq__
    text = text.with_columns(
        pl.when(is_("missing_entity_id"))
        .then(None)
        .otherwise(pl.col("entity_id"))
        .alias("entity_id"),
        pl.when(is_("unparseable_ts"))
        .then(pl.lit("not-a-time"))
        .otherwise(pl.col("ts"))
        .alias("ts"),
        pl.when(is_("unknown_event_type"))
        .then(pl.lit("??"))
        .otherwise(pl.col("event_type"))
        .alias("event_type"),
        pl.when(is_("negative_amount"))
        .then(pl.lit("-1.0"))
        .otherwise(pl.col("amount"))
        .alias("amount"),
    )
    # A duplicate is an extra copy of a delivered row (an at-least-once feed replaying it).
    dupes = text.filter(is_("duplicate_event_id")).with_columns(pl.lit("").alias("__fault"))
    text = text.with_columns(
        pl.when(is_("duplicate_event_id"))
        .then(pl.lit(""))
        .otherwise(pl.col("__fault"))
        .alias("__fault")
    )
    return pl.concat([text, dupes]).drop("__fault")
