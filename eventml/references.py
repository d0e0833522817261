"""Reference tables: attributes of an entity or of another key (a holder's region, a shop's
country) that hold from a time on, attached to every event point in time.

A pack declares each table (`references`: its name, the event column it is keyed by, the
attribute columns it supplies, and the column of the time each row starts to hold). Its rows are
validated like events (`validate_reference`: a bad row is a reject with its reason, nothing is
dropped), and every event takes the supplied columns of its key's latest row valid at the
event's time (`attach`): an event-time temporal join, as Flink's temporal joins or Feast's
point-in-time joins make. From then on the columns are ordinary event attributes: features, the
encoder and the online store read them as if the feed had sent them, and no row valid only after
an event ever reaches it. A scoring request never carries them: the service attaches them to its
decision and recent events with the same function, from the rows the online store holds.

Rows apply as known when events are ingested: a row that arrives after events it would have
covered (a correction dated in the past) reaches them when their days are ingested again.
A key with several rows of the same `valid_from` keeps the last one delivered (a correction).
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from eventml.schema import TS_TYPE, DatasetSpec, Reference
from eventml.validation import (
    Validated,
    blank,
    first_failure,
    parse_ts,
    parse_values,
    value_checks,
)

VALID_FROM = "valid_from"  # the canonical name of a row's validity time


def reference_schema(ref: Reference, spec: DatasetSpec) -> dict[str, pl.DataType]:
    """A reference table's clean columns: its key, `valid_from`, then the columns it supplies."""
    events = spec.event_schema()
    return {ref.key: pl.String(), VALID_FROM: TS_TYPE, **{c: events[c] for c in ref.columns}}


def empty_reference(ref: Reference, spec: DatasetSpec) -> pl.DataFrame:
    return pl.DataFrame(schema=reference_schema(ref, spec))


def validate_reference(
    raw: pl.DataFrame, ref: Reference, spec: DatasetSpec, source: str | pl.Series = "unknown"
) -> Validated:
    """Split delivered rows of `ref` (in the source's column names, text or typed) into clean
    rows (`reference_schema`, one per key and `valid_from`: the last delivered wins) and rejects
    (every column as text, with `reason`, `field` and `source`).

    Checks, first failure wins: the key missing; `valid_from` missing or not a time; then the
    contract's checks of every supplied column (declared categories, numbers that parse, are
    finite and within bounds, text within bounds)."""
    schema = reference_schema(ref, spec)
    names = {**{c: spec.columns.get(c, c) for c in schema}, VALID_FROM: ref.valid_from}
    present = {c: src for c, src in names.items() if src in raw.columns}
    mapped = raw.select(
        *[pl.col(src).alias(c) for c, src in present.items()],
        # As many nulls as rows, even when no column is present (a literal alone is one row).
        *[
            pl.repeat(None, raw.height, dtype=pl.String).alias(c)
            for c in schema
            if c not in present
        ],
    ).with_columns(
        (source if isinstance(source, pl.Series) else pl.lit(source))
        .cast(pl.String)
        .alias("__source")
    )
    text = [ref.key, *(c for c in ref.columns if schema[c] == pl.String())]
    numeric = [c for c in ref.columns if schema[c] == pl.Float64()]
    parsed = mapped.with_columns(
        parse_ts(pl.col(VALID_FROM), mapped.schema[VALID_FROM], spec).alias(f"__{VALID_FROM}"),
        *parse_values(text, numeric, ids=(ref.key,)),
    )
    checks = [
        (blank(ref.key), f"missing_{ref.key}", ref.key),
        (pl.col(VALID_FROM).is_null(), f"missing_{VALID_FROM}", VALID_FROM),
        (pl.col(f"__{VALID_FROM}").is_null(), f"unparseable_{VALID_FROM}", VALID_FROM),
        *value_checks(spec, text, numeric),
    ]
    tagged = parsed.with_columns(first_failure(checks))
    clean = (
        tagged.filter(pl.col("reason").is_null())
        .select(pl.col(f"__{c}").cast(t).alias(c) for c, t in schema.items())
        .unique([ref.key, VALID_FROM], keep="last", maintain_order=True)
        .sort(ref.key, VALID_FROM)
    )
    rejects = tagged.filter(pl.col("reason").is_not_null()).select(
        *[pl.col(c).cast(pl.String) for c in schema],
        "reason",
        "field",
        pl.col("__source").alias("source"),
    )
    return Validated(clean=clean, rejects=rejects)


def attach(
    events: pl.DataFrame, tables: Mapping[str, pl.DataFrame], spec: DatasetSpec
) -> pl.DataFrame:
    """`events` (any order, kept) with every supplied column set from its key's latest row of
    the reference table valid at the event's `ts` (null where none is: no row yet, an unknown
    key, a null key). `tables`: each reference's clean rows by name; a missing one is empty."""
    if not spec.references or events.is_empty():
        return events
    out = events.with_row_index("__row").sort("ts")
    for ref in spec.references:
        # In the pack's columns: a table written before the pack grew a column holds it as null.
        stored = tables.get(ref.name, empty_reference(ref, spec))
        rows = stored.select(
            pl.col(c).cast(t) if c in stored.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in reference_schema(ref, spec).items()
        ).sort(VALID_FROM)
        out = out.drop(ref.columns).join_asof(
            rows, left_on="ts", right_on=VALID_FROM, by=ref.key, strategy="backward",
            check_sortedness=False,
        ).drop(VALID_FROM)  # fmt: skip
    return out.sort("__row").select(events.columns)
