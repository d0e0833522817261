"""Validation against the event contract: a source's rows split into clean events and rejected
rows with a reason each. Nothing is dropped: every input row is in exactly one of the two.

The checks of values (categories, numbers, bounds) are shared with reference tables
(`eventml.references`), so a row means the same whichever table it arrives in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl

from eventml.schema import REQUIRED_COLUMNS, DatasetSpec


@dataclass(frozen=True)
class Validated:
    clean: pl.DataFrame
    rejects: pl.DataFrame

    def reject_counts(self) -> dict[str, int]:
        """Rejected rows per reason, e.g. {'unknown_event_type': 3}."""
        counts = self.rejects.group_by("reason").len().sort("reason")
        return dict(zip(counts["reason"], counts["len"], strict=True))


def map_columns(raw: pl.DataFrame, spec: DatasetSpec) -> pl.DataFrame:
    """Rename a source's columns to canonical names; columns the spec does not declare are dropped
    and declared ones that are absent take the spec's constant, or null (rows missing a
    required one are rejected)."""
    renamed = raw.rename({src: dst for dst, src in spec.columns.items() if src in raw.columns})
    referenced = spec.referenced_columns  # a reference table supplies them, not the feed
    return renamed.select(
        pl.col(c)
        if c in renamed.columns and c not in referenced
        else pl.lit(spec.constants.get(c), dtype=pl.String()).alias(c)
        for c in spec.event_schema()
    )


def parse_ts(col: pl.Expr, dtype: pl.DataType, spec: DatasetSpec) -> pl.Expr:
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return (
                col.dt.replace_time_zone(spec.timezone)
                .dt.convert_time_zone("UTC")
                .dt.cast_time_unit("us")
            )
        return col.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(dtype, pl.Date):
        return (
            col.cast(pl.Datetime("us"))
            .dt.replace_time_zone(spec.timezone)
            .dt.convert_time_zone("UTC")
        )
    text = col.cast(pl.String).str.strip_chars()
    # ISO 8601: with an offset it names its own instant; without, it is read in the spec's zone.
    iso = text.str.replace(r"Z$", "+00:00").str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
    aware = iso.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S%.f%z", strict=False)
    naive = pl.coalesce(
        iso.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S%.f", strict=False),
        iso.str.strptime(pl.Datetime("us"), "%Y-%m-%d", strict=False),
    )
    if (
        spec.ts_format
    ):  # the source's own format first; ISO still parses (typed columns arrive as ISO)
        naive = pl.coalesce(
            text.str.strptime(pl.Datetime("us"), spec.ts_format, strict=False), naive
        )
    local = naive.dt.replace_time_zone(spec.timezone, non_existent="null", ambiguous="earliest")
    return pl.coalesce(aware.dt.convert_time_zone("UTC"), local.dt.convert_time_zone("UTC"))


def validate(
    raw: pl.DataFrame,
    spec: DatasetSpec,
    now: datetime | None = None,
    source: str | pl.Series = "unknown",
    days: tuple[date, date] | None = None,
) -> Validated:
    """Split source rows into clean events and rejects with one reason each.

    Checks, first failure wins: a required field missing; a timestamp or number that does not
    parse; an event type outside the vocabulary; a categorical value outside its declared
    `categories`; a non-finite number or one past
    `spec.max_abs_value`; text past `spec.max_text_length`; a negative amount; a timestamp
    before `spec.source_start` or after `now`; an event id already seen (the first copy is kept).
    `source` (one name, or one per row) is recorded on rejects so a user can find the bad file.
    With `days` ([first, end) of the partitions), an otherwise clean event on a day outside them
    is rejected as `outside_partitions`: there is no day to keep it on.
    """
    now = now or datetime.now(UTC)
    mapped = map_columns(raw, spec).with_columns(
        (source if isinstance(source, pl.Series) else pl.lit(source))
        .cast(pl.String)
        .alias("__source")
    )
    schema = spec.event_schema()
    numeric_cols = [c for c, t in schema.items() if t == pl.Float64()]
    text_cols = ["entity_id", "event_id", "event_type", *spec.categorical]

    parsed = mapped.with_columns(
        parse_ts(pl.col("ts"), mapped.schema["ts"], spec).alias("__ts"),
        *parse_values(text_cols, numeric_cols, ids=("entity_id", "event_id", "event_type")),
    )

    # (condition, reason, field); reasons name their field so counts by reason say what to fix.
    checks: list[tuple[pl.Expr, str, str]] = [
        *[
            (blank(c) if c != "ts" else pl.col("ts").is_null(), f"missing_{c}", c)
            for c in REQUIRED_COLUMNS
        ],
        (pl.col("__ts").is_null(), "unparseable_ts", "ts"),
        (~pl.col("__event_type").is_in(list(spec.event_types)), "unknown_event_type", "event_type"),
        *value_checks(spec, text_cols, numeric_cols),
        (pl.col("__amount") < 0, "negative_amount", "amount"),
        (pl.col("__ts") < spec.source_start, "ts_before_source_start", "ts"),
        (pl.col("__ts") > now, "ts_in_future", "ts"),
    ]
    if days is not None:
        day = pl.col("__ts").dt.date()
        checks.append((~((day >= days[0]) & (day < days[1])), "outside_partitions", "ts"))
    tagged = parsed.with_columns(first_failure(checks))

    # Duplicates are judged among otherwise valid rows so a broken copy cannot shadow a good one.
    tagged = tagged.with_columns(
        pl.when(
            pl.col("reason").is_null()
            & (pl.int_range(pl.len()).over("__event_id", pl.col("reason").is_null()) > 0)
        )
        .then(pl.lit("duplicate_event_id"))
        .otherwise(pl.col("reason"))
        .alias("reason"),
    ).with_columns(
        pl.when(pl.col("reason") == "duplicate_event_id")
        .then(pl.lit("event_id"))
        .otherwise(pl.col("field"))
        .alias("field")
    )

    clean = tagged.filter(pl.col("reason").is_null()).select(
        (
            pl.col("__ts")
            if c == "ts"
            else pl.col(f"__{c}")
            if f"__{c}" in tagged.columns
            else pl.col(c)
        )
        .cast(t)
        .alias(c)
        for c, t in schema.items()
    )
    rejects = tagged.filter(pl.col("reason").is_not_null()).select(
        *[pl.col(c).cast(pl.String).alias(c) for c in schema],
        "reason",
        "field",
        pl.col("__source").alias("source"),
    )
    return Validated(clean=clean, rejects=rejects)


# ------------------------------------------------------------ checks shared with reference tables


def parse_values(text: list[str], numeric: list[str], ids: tuple[str, ...] = ()) -> list[pl.Expr]:
    """`__<column>` as a check reads it: numbers parsed, ids stripped, categorical values as the
    request models read them (stripped, blank is missing)."""
    return [
        *[pl.col(c).cast(pl.Float64, strict=False).alias(f"__{c}") for c in numeric],
        *[
            pl.col(c).cast(pl.String).str.strip_chars().alias(f"__{c}")
            if c in ids
            else pl.col(c).cast(pl.String).str.strip_chars().replace("", None).alias(f"__{c}")
            for c in text
        ],
    ]


def blank(c: str) -> pl.Expr:
    return pl.col(f"__{c}").is_null() | (pl.col(f"__{c}") == "")


def value_checks(
    spec: DatasetSpec, text: list[str], numeric: list[str]
) -> list[tuple[pl.Expr, str, str]]:
    """The contract's checks of parsed values: declared categories, numbers that parse, are
    finite and within `max_abs_value`, text within `max_text_length`."""
    return [
        *[
            (
                ~pl.col(f"__{c}").is_in(list(spec.categories[c])) & pl.col(f"__{c}").is_not_null(),
                f"unknown_{c}",
                c,
            )
            for c in text
            if c in spec.categories
        ],
        *[
            (pl.col(c).is_not_null() & pl.col(f"__{c}").is_null(), f"unparseable_{c}", c)
            for c in numeric
        ],
        *[(~pl.col(f"__{c}").is_finite(), f"non_finite_{c}", c) for c in numeric],
        *[(pl.col(f"__{c}").abs() > spec.max_abs_value, f"out_of_range_{c}", c) for c in numeric],
        *[
            (pl.col(f"__{c}").str.len_chars() > spec.max_text_length, f"too_long_{c}", c)
            for c in text
        ],
    ]


def first_failure(checks: list[tuple[pl.Expr, str, str]]) -> list[pl.Expr]:
    """`reason` and `field` of the first check a row fails (null for none)."""
    reason = pl.lit(None, dtype=pl.String)
    field = pl.lit(None, dtype=pl.String)
    for cond, why, col in reversed(checks):  # the first check listed takes precedence
        hit = cond.fill_null(False)
        reason = pl.when(hit).then(pl.lit(why)).otherwise(reason)
        field = pl.when(hit).then(pl.lit(col)).otherwise(field)
    return [reason.alias("reason"), field.alias("field")]
