"""The event contract: one generic event table, a dataset spec per source, and validation.

Every source (the simulator, a landing zone of a user's own files) is mapped onto the same
table by a `DatasetSpec` and then split by `validate` into clean rows and rejected rows with a
reason each. Nothing is dropped: every input row is in exactly one of the two outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TS_TYPE = pl.Datetime("us", "UTC")
ISO_UTC = "%Y-%m-%dT%H:%M:%S%.6f+00:00"  # how a typed timestamp is kept as text

# The columns every event table has, whatever the source. Attributes come after them.
CORE_COLUMNS: dict[str, pl.DataType] = {
    "entity_id": pl.String(),
    "event_id": pl.String(),
    "ts": TS_TYPE,
    "event_type": pl.String(),
    "amount": pl.Float64(),
}
REQUIRED_COLUMNS = ("entity_id", "event_id", "ts", "event_type")


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the field and what to do."""


class Label(BaseModel):
    """A supervised target attached to each decision event.

    `kind="event_within"`: 1 if an event of `event_type` happens to the same entity within
    `horizon_days` after the decision (e.g. `chargeback_30d` = a `chargeback` within 30 days).
    `kind="column"`: the value of `column` on the decision event itself (e.g. `fraud` on a card
    payment), known `horizon_days` after the decision.
    Either way the label matures at decision time + `horizon_days` and is unknown before then.
    `applies_when` restricts the label to decisions whose categorical attributes match (a
    default can only follow an approved loan); elsewhere the label is null.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["event_within", "column"]
    horizon_days: int = Field(ge=0)
    event_type: str | None = None
    column: str | None = None
    applies_when: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_has_its_field(self) -> Label:
        if self.kind == "event_within" and not self.event_type:
            raise ValueError(f"label {self.name!r}: kind 'event_within' needs 'event_type'")
        if self.kind == "column" and not self.column:
            raise ValueError(f"label {self.name!r}: kind 'column' needs 'column'")
        return self


class DatasetSpec(BaseModel):
    """How one source maps onto the event table, and what its decisions and labels are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    # Events before this instant are rejected: they predate the source and would be partial.
    source_start: datetime
    event_types: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    decision_event_types: tuple[str, ...]
    labels: tuple[Label, ...] = ()
    # Label -> the column holding its true probability, where a simulator knows it: carried to
    # `decisions` for the oracle's metrics, never an input.
    oracle: dict[str, str] = Field(default_factory=dict)
    # Known values of categorical columns that features encode as codes. Declared, not learned
    # from data, so a code means the same thing in every day's partition and in serving.
    categories: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # Column roles beyond categorical/numeric. Identifiers are categorical columns whose values
    # are ids (a device, a terminal, a merchant): never a vocabulary; the encoder codes them by
    # their order of appearance in each history, features count distinct and seen-before ones.
    identifiers: tuple[str, ...] = ()
    # Attribute columns kept in the tables but never an input (a feature, an encoder input, a
    # request field): an internal reference, a free-text note, a column under review.
    excluded: tuple[str, ...] = ()
    # canonical column name -> the source's column name, for sources with their own names.
    columns: dict[str, str] = Field(default_factory=dict)
    # canonical column name -> the value every row has when the source has no such column
    # (a card feed without an event type: every row a `payment`).
    constants: dict[str, str] = Field(default_factory=dict)
    # strftime format of the source's `ts` strings; ISO 8601 when unset.
    ts_format: str | None = None
    # Naive timestamps in the source are read in this zone, then stored as UTC.
    timezone: str = "UTC"
    # The contract's bounds, the same for ingest, the request models and `recent_events`
    # (with `source_start` and "not in the future"): a value past them is a reject or a 4xx.
    max_abs_value: float = Field(1e9, gt=0)  # `amount` and every numeric attribute
    max_text_length: int = Field(256, gt=0)  # ids and categorical values, in characters

    @field_validator("source_start")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        known = set(self.event_types)
        attrs = set(self.categorical) | set(self.numeric) | set(self.oracle_columns)
        if clash := attrs & set(CORE_COLUMNS):
            raise ValueError(f"attribute columns {sorted(clash)} shadow core columns; rename them")
        # The scoring API's request fields are the attribute columns beside these.
        reserved = {"decision_id", "recent_events"}
        if bad := sorted(
            c
            for c in attrs
            if c in reserved or not c.isidentifier() or c.startswith("_") or c.startswith("model_")
        ):
            raise ValueError(
                f"attribute columns {bad} cannot be request fields: use names that are Python "
                "identifiers, not starting with '_' or 'model_', other than decision_id and "
                "recent_events (map the source's names with `columns`)"
            )
        for t in self.decision_event_types:
            if t not in known:
                raise ValueError(f"decision_event_types: {t!r} is not in event_types")
        for label in self.labels:
            if label.kind == "event_within" and label.event_type not in known:
                raise ValueError(
                    f"labels.{label.name}.event_type: {label.event_type!r} is not in event_types"
                )
            if label.kind == "column" and label.column not in attrs:
                raise ValueError(
                    f"labels.{label.name}.column: {label.column!r} is not a declared attribute"
                )
            for col in label.applies_when:
                if col not in self.categorical:
                    raise ValueError(
                        f"labels.{label.name}.applies_when: {col!r} is not a categorical column"
                    )
        labels = {label.name for label in self.labels}
        if unknown := sorted(set(self.oracle) - labels):
            raise ValueError(f"oracle: {unknown} are not labels; key the oracle by label name")
        if bad := sorted(set(self.constants) - set(self.event_schema())):
            raise ValueError(f"constants: {bad} are not canonical or declared columns")
        if undeclared := set(self.categories) - set(self.categorical):
            raise ValueError(f"categories: {sorted(undeclared)} are not categorical columns")
        if bad := sorted(set(self.identifiers) - set(self.categorical)):
            raise ValueError(f"identifiers: {bad} are not categorical columns; declare them there")
        if both := sorted(set(self.identifiers) & set(self.categories)):
            raise ValueError(
                f"identifiers: {both} also have declared categories; an id column has no fixed "
                "vocabulary: drop its `categories` or its `identifiers` entry"
            )
        if bad := sorted(set(self.excluded) - set(self.categorical) - set(self.numeric)):
            raise ValueError(f"excluded: {bad} are not declared attribute columns")
        unknown = set(self.columns) - set(self.event_schema())
        if unknown:
            raise ValueError(f"columns: {sorted(unknown)} are not canonical or declared columns")
        return self

    @property
    def oracle_columns(self) -> tuple[str, ...]:
        return tuple(self.oracle.values())

    @property
    def label_columns(self) -> frozenset[str]:
        """Columns holding a label: never an input (a feature, an encoder input, a request field)."""
        return frozenset(label.column for label in self.labels if label.kind == "column")

    @property
    def input_categorical(self) -> tuple[str, ...]:
        """Categorical columns a model may read: neither a label nor excluded."""
        hidden = self.label_columns | set(self.excluded)
        return tuple(c for c in self.categorical if c not in hidden)

    @property
    def input_numeric(self) -> tuple[str, ...]:
        """Numeric columns a model may read: neither a label nor excluded."""
        hidden = self.label_columns | set(self.excluded)
        return tuple(c for c in self.numeric if c not in hidden)

    def event_schema(self) -> dict[str, pl.DataType]:
        """The clean event table's columns and types, in order."""
        schema = dict(CORE_COLUMNS)
        schema.update({c: pl.String() for c in self.categorical})
        schema.update({c: pl.Float64() for c in (*self.numeric, *self.oracle_columns)})
        return schema

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(
            f"no label {name!r} in spec {self.name!r}; have {[x.name for x in self.labels]}"
        )

    @classmethod
    def from_dict(cls, data: dict, origin: str = "dataset spec") -> DatasetSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                for err in e.errors()
            )
            raise SpecError(f"{origin} is invalid: {problems}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSpec:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"cannot read dataset pack {path}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"dataset pack {path} must be a YAML mapping of fields")
        return cls.from_dict(data, origin=f"dataset pack {path}")


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
    return renamed.select(
        pl.col(c)
        if c in renamed.columns
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

    parsed = mapped.with_columns(
        parse_ts(pl.col("ts"), mapped.schema["ts"], spec).alias("__ts"),
        *[pl.col(c).cast(pl.Float64, strict=False).alias(f"__{c}") for c in numeric_cols],
        *[
            pl.col(c).cast(pl.String).str.strip_chars().alias(f"__{c}")
            for c in ("entity_id", "event_id", "event_type")
        ],
        # Categorical values as the request models read them: stripped, and blank is missing.
        *[
            pl.col(c).cast(pl.String).str.strip_chars().replace("", None).alias(f"__{c}")
            for c in spec.categorical
        ],
    )

    def blank(c: str) -> pl.Expr:
        return pl.col(f"__{c}").is_null() | (pl.col(f"__{c}") == "")

    # (condition, reason, field); reasons name their field so counts by reason say what to fix.
    checks: list[tuple[pl.Expr, str, str]] = [
        *[
            (blank(c) if c != "ts" else pl.col("ts").is_null(), f"missing_{c}", c)
            for c in REQUIRED_COLUMNS
        ],
        (pl.col("__ts").is_null(), "unparseable_ts", "ts"),
        (~pl.col("__event_type").is_in(list(spec.event_types)), "unknown_event_type", "event_type"),
        *[
            (
                ~pl.col(f"__{c}").is_in(list(values)) & pl.col(f"__{c}").is_not_null(),
                f"unknown_{c}",
                c,
            )
            for c, values in spec.categories.items()
        ],
        *[
            (pl.col(c).is_not_null() & pl.col(f"__{c}").is_null(), f"unparseable_{c}", c)
            for c in numeric_cols
        ],
        *[(~pl.col(f"__{c}").is_finite(), f"non_finite_{c}", c) for c in numeric_cols],
        *[
            (pl.col(f"__{c}").abs() > spec.max_abs_value, f"out_of_range_{c}", c)
            for c in numeric_cols
        ],
        *[
            (pl.col(f"__{c}").str.len_chars() > spec.max_text_length, f"too_long_{c}", c)
            for c in ("entity_id", "event_id", "event_type", *spec.categorical)
        ],
        (pl.col("__amount") < 0, "negative_amount", "amount"),
        (pl.col("__ts") < spec.source_start, "ts_before_source_start", "ts"),
        (pl.col("__ts") > now, "ts_in_future", "ts"),
    ]
    if days is not None:
        day = pl.col("__ts").dt.date()
        checks.append((~((day >= days[0]) & (day < days[1])), "outside_partitions", "ts"))
    reason = pl.lit(None, dtype=pl.String)
    field = pl.lit(None, dtype=pl.String)
    for cond, why, col in reversed(checks):  # the first check listed takes precedence
        hit = cond.fill_null(False)
        reason = pl.when(hit).then(pl.lit(why)).otherwise(reason)
        field = pl.when(hit).then(pl.lit(col)).otherwise(field)
    tagged = parsed.with_columns(reason.alias("reason"), field.alias("field"))

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
