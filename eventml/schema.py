"""The event contract: one generic event table, and a dataset spec per source.

Every source (the simulator, a landing zone of a user's own files) is mapped onto the same
table by a `DatasetSpec`: its columns and their roles, event types, decisions, labels, reference
tables and bounds. `eventml.validation` splits a source's rows by it into clean events and
rejects.
"""

from __future__ import annotations

from datetime import UTC, datetime
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


class Reference(BaseModel):
    """A reference table: attributes of an entity or of another key (a holder's region, a
    terminal's kind) that hold from a time on, attached to every event point in time
    (`eventml.references`). Its rows carry `key`, `valid_from` and `columns`, in the source's
    names where the spec's `columns` map them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # its table is reference_<name>; its files land in landing/references/<name>/
    key: str  # the event column it is keyed by: entity_id or a categorical column
    columns: tuple[str, ...]  # the attribute columns it supplies (declared as usual)
    valid_from: str = "valid_from"  # the source's column of the time a row starts to hold


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
    # Reference tables (a customer's profile, a terminal's kind): each supplies some of the
    # attribute columns above from its own rows, by key and validity time, never the event feed.
    references: tuple[Reference, ...] = ()
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
        self._check_references()
        return self

    def _check_references(self) -> None:
        supplied: dict[str, str] = {}
        if self.references and "valid_from" in (*self.categorical, *self.numeric):
            raise ValueError(
                "an attribute is named valid_from, a reference table's time: rename it"
            )
        for ref in self.references:
            where = f"references.{ref.name}"
            if not ref.name.isidentifier():
                raise ValueError(f"{where}: the name must be an identifier (it names a table)")
            if ref.name in {r.name for r in self.references if r is not ref}:
                raise ValueError(f"{where}: two references share this name")
            if ref.key not in ("entity_id", *self.input_categorical):
                raise ValueError(
                    f"{where}.key: {ref.key!r} is not entity_id or a categorical input column (a "
                    "request must carry the key for the service to attach the table)"
                )
            for col in ref.columns:
                if col not in (*self.categorical, *self.numeric):
                    raise ValueError(
                        f"{where}.columns: {col!r} is not a declared attribute; declare it under "
                        "categorical or numeric"
                    )
                if col in self.label_columns or col in self.oracle_columns:
                    raise ValueError(f"{where}.columns: {col!r} holds a label or an oracle")
                if col in supplied or col == ref.key:
                    raise ValueError(
                        f"{where}.columns: {col!r} is already supplied "
                        f"({'its key' if col == ref.key else 'by ' + supplied[col]})"
                    )
                supplied[col] = ref.name
        for ref in self.references:
            if ref.key in supplied:
                raise ValueError(
                    f"references.{ref.name}.key: {ref.key!r} is supplied by "
                    f"{supplied[ref.key]}; a key must come from the events"
                )
        for label in self.labels:
            if bad := sorted(set(label.applies_when) & set(supplied)):
                raise ValueError(
                    f"labels.{label.name}.applies_when: {bad} come from a reference table; "
                    "a label's condition reads the decision event's own columns"
                )

    @property
    def referenced_columns(self) -> dict[str, str]:
        """Attribute column -> the reference table that supplies it."""
        return {col: ref.name for ref in self.references for col in ref.columns}

    @property
    def request_categorical(self) -> tuple[str, ...]:
        """The categorical fields of a scoring request: inputs the caller sends, not those a
        reference table supplies (the server attaches them)."""
        return tuple(c for c in self.input_categorical if c not in self.referenced_columns)

    @property
    def request_numeric(self) -> tuple[str, ...]:
        return tuple(c for c in self.input_numeric if c not in self.referenced_columns)

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
