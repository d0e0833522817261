"""Where raw rows come from, and how a run's days are cut out of them.

Two sources feed the same contract: the simulator (optionally with the faults a real feed has,
so the rejects path is exercised every day) and a landing zone of Parquet/CSV files in the
user's own columns, mapped by a `DatasetSpec`. `ingest_days` validates either and returns the
clean events and the rejects of the requested days, each row tagged with its partition `day`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from pathlib import Path

import numpy as np
import polars as pl

from eventml.schema import DatasetSpec, Validated, map_columns, parse_ts, validate

LANDING_SUFFIXES = (".parquet", ".csv")
DAY = "day"  # the partition column of raw_events and event_rejects (a UTC date)


def midnight(day: date) -> datetime:
    """The instant a partition day starts (UTC): day d holds events in [midnight(d), midnight(d + 1))."""
    return datetime.combine(day, time(), UTC)


# ---------------------------------------------------------------- landing zone


def landing_files(folder: str | Path) -> list[Path]:
    """Data files in the landing zone, oldest name first. Names starting with '.' or '_' are
    files still being written (the usual convention for an atomic drop), so they wait."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in LANDING_SUFFIXES and p.name[0] not in "._"
    )


def read_landing_file(path: Path, spec: DatasetSpec) -> pl.DataFrame:
    """One file's rows in canonical columns, all as text, so a value that will not parse is still
    kept verbatim for the rejects table. Typed timestamps are rendered as ISO 8601 in UTC."""
    if path.suffix.lower() == ".csv":
        frame = pl.read_csv(path, infer_schema=False)
    else:
        frame = pl.read_parquet(path)
    mapped = map_columns(frame, spec)
    ts_type = mapped.schema["ts"]
    if isinstance(ts_type, pl.Datetime | pl.Date):
        mapped = mapped.with_columns(
            parse_ts(pl.col("ts"), ts_type, spec)
            .dt.strftime("%Y-%m-%dT%H:%M:%S%.6f+00:00")
            .alias("ts")
        )
    return mapped.with_columns(pl.all().cast(pl.String), pl.lit(path.name).alias("source"))


def read_landing(files: list[Path], spec: DatasetSpec) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(schema={c: pl.String for c in [*spec.event_schema(), "source"]})
    return pl.concat([read_landing_file(p, spec) for p in files], how="vertical")


def file_days(path: Path, spec: DatasetSpec) -> list[date]:
    """The UTC days a landing file has rows for (what the landing sensor asks to ingest)."""
    rows = read_landing_file(path, spec)
    days = (
        rows.select(parse_ts(pl.col("ts"), pl.String(), spec).dt.date().alias(DAY))
        .drop_nulls()
        .unique()
        .sort(DAY)
    )
    return days[DAY].to_list()


# ---------------------------------------------------------------- a run's days


def ingest_days(
    raw: pl.DataFrame,
    spec: DatasetSpec,
    start: date,
    end: date,
    now: datetime | None = None,
) -> Validated:
    """Validate `raw` (canonical columns as text or typed, plus `source`) and keep the rows of
    days [start, end), each with its `day`.

    All of `raw` is validated together so a duplicate is caught even across files. A rejected
    row whose timestamp cannot be read has no day of its own: it goes with the first day its
    file has rows for, so it is counted exactly once however the days are split into runs.
    """
    source = raw["source"] if "source" in raw.columns else "unknown"
    checked = validate(raw.drop("source", strict=False), spec, now=now, source=source)
    clean = checked.clean.with_columns(pl.col("ts").dt.date().alias(DAY))
    rejects = checked.rejects.with_columns(
        parse_ts(pl.col("ts"), pl.String(), spec).dt.date().alias(DAY)
    )
    first_day = (
        raw.select(
            pl.col("source") if "source" in raw.columns else pl.lit("unknown").alias("source"),
            parse_ts(pl.col("ts"), raw.schema["ts"], spec).dt.date().alias("__first_day"),
        )
        .group_by("source")
        .agg(pl.col("__first_day").min())
    )
    rejects = (
        rejects.join(first_day, on="source", how="left")
        .with_columns(pl.coalesce(DAY, "__first_day", pl.lit(start)).alias(DAY))
        .drop("__first_day")
    )
    in_range = (pl.col(DAY) >= start) & (pl.col(DAY) < end)
    return Validated(clean=clean.filter(in_range), rejects=rejects.filter(in_range))


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
