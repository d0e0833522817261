"""The feature declaration language: which events a feature reads (`EventFilter`), what it
computes (`Feature`, one of the `Kind`s), and the declared set with its vocabularies (`FeatureSet`).

Point-in-time rule: an event counts for a decision at time t only if its ts < t, strictly. An
event at the same microsecond (the decision event itself, or anything logged with it) is after.
Windows are half-open, [t - w, t); "all" is the entity's whole history before t.

Categorical values become stable ints through a vocabulary stored in the `FeatureSet`: code i+1
for the i-th value of the sorted vocabulary, 0 for a value the vocabulary has never seen, null for
a missing value (XGBoost treats null as missing). The vocabulary is fixed when the feature set is
built, so a new category in tomorrow's data cannot renumber yesterday's features.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import polars as pl

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR

Kind = Literal[
    "count",  # events matching `events` in the window
    "sum",  # sum of their non-null values of numeric `column` (0 when none)
    "mean",  # mean of those values (null when none)
    "max",  # max of those values (null when none)
    "distinct",  # distinct non-null values of `column` in the window
    "days_since",  # days since the latest matching event (null when none)
    "trend",  # matching events in [t-w, t) minus those in [t-2w, t-w)
    "ratio",  # count(events) / count(denominator) in the window (null when the latter is 0)
    "static",  # latest non-null value of `column` before t, as a vocabulary code
    "decision_value",  # the decision event's own numeric attribute
    "decision_category",  # the decision event's own categorical attribute, as a vocabulary code
    "seen_before",  # prior events carrying the decision's own value of `column` (e.g. its device)
    # Keyed by the decision's value of `column` rather than its entity, over whole days before
    # the decision's day (`eventml.features.keyed`):
    "key_count",  # events matching `events` at that key
    "key_positives",  # decisions at that key whose `label` matured positive
    "key_rate",  # those positives per decision at that key whose `label` matured
]
STAT_KINDS = {"sum", "mean", "max"}
FLOAT_KINDS = {*STAT_KINDS, "days_since", "ratio", "decision_value", "key_rate"}
KEYED_KINDS = {"key_count", "key_positives", "key_rate"}
WINDOWED_KINDS = {"count", *STAT_KINDS, "distinct", "trend", "ratio"}


def window_us(window: str) -> int | None:
    """'1h' / '30d' → microseconds; 'all' → None (the entity's whole history)."""
    if window == "all":
        return None
    m = re.fullmatch(r"(\d+)([hd])", window)
    if not m or int(m[1]) == 0:
        raise ValueError(
            f"window {window!r}: use a positive number of hours or days ('1h', '30d') or 'all'"
        )
    return int(m[1]) * (US_PER_HOUR if m[2] == "h" else US_PER_DAY)


@dataclass(frozen=True)
class EventFilter:
    """Which events a feature looks at: one type (None: any) and categorical equalities."""

    event_type: str | None = None
    where: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        base = self.event_type or "events"
        return "_".join([base, *(f"{c}_{v}" for c, v in self.where)])

    def expr(self) -> pl.Expr:
        cond = pl.lit(True) if self.event_type is None else pl.col("event_type") == self.event_type
        for col, value in self.where:
            cond = cond & (pl.col(col) == value)
        return cond.fill_null(False)

    def mask(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        """The same condition over numpy columns of one history (the request path)."""
        m = np.ones(len(cols["ts"]), bool)
        if self.event_type is not None:
            m &= cols["event_type"] == self.event_type
        for col, value in self.where:
            m &= cols[col] == value
        return m


@dataclass(frozen=True)
class Feature:
    name: str
    kind: Kind
    reason: str  # human-readable meaning, reused for reason codes
    window: str = "all"
    events: EventFilter | None = None
    denominator: EventFilter | None = None
    column: str | None = None
    label: str | None = None  # the label a keyed positives count or rate reads

    @property
    def dtype(self) -> pl.DataType:
        return pl.Float64() if self.kind in FLOAT_KINDS else pl.Int32()


@dataclass(frozen=True)
class FeatureSet:
    """The declared features, in output order, and the vocabularies that encode categoricals."""

    features: tuple[Feature, ...]
    event_types: tuple[str, ...]  # every type the events may have (the spec's vocabulary)
    vocab: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for f in self.features:
            for flt in (f.events, f.denominator):
                if flt and flt.event_type is not None and flt.event_type not in self.event_types:
                    raise ValueError(
                        f"feature {f.name!r}: event type {flt.event_type!r} is not in event_types"
                    )
            if f.name in seen:
                raise ValueError(f"feature {f.name!r} is declared twice; names must be unique")
            seen.add(f.name)
            window_us(f.window)
            if f.kind in {"trend"} and f.window == "all":
                raise ValueError(f"feature {f.name!r}: a trend needs a finite window")
            needs_events = f.kind in WINDOWED_KINDS - {"distinct"} or f.kind in {
                "days_since",
                "key_count",
            }
            if needs_events and f.events is None:
                raise ValueError(f"feature {f.name!r}: kind {f.kind!r} needs `events`")
            if f.kind == "ratio" and f.denominator is None:
                raise ValueError(f"feature {f.name!r}: kind 'ratio' needs `denominator`")
            needs_col = {"distinct", "static", "decision_value", "decision_category", "seen_before",
                         *STAT_KINDS, *KEYED_KINDS}  # fmt: skip
            if f.kind in KEYED_KINDS - {"key_count"} and not f.label:
                raise ValueError(f"feature {f.name!r}: kind {f.kind!r} needs `label`")
            if f.kind in KEYED_KINDS and f.window != "all" and window_us(f.window) % US_PER_DAY:
                raise ValueError(
                    f"feature {f.name!r}: keyed features count whole days ('7d', 'all'), "
                    f"not {f.window!r}"
                )
            if f.kind in needs_col and not f.column:
                raise ValueError(f"feature {f.name!r}: kind {f.kind!r} needs `column`")
            if f.kind in {"static", "decision_category"} and f.column not in self.vocab:
                raise ValueError(
                    f"feature {f.name!r}: column {f.column!r} has no vocabulary; "
                    "build one with category_vocab(events, columns)"
                )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def schema(self) -> dict[str, pl.DataType]:
        return {f.name: f.dtype for f in self.features}

    def reasons(self) -> dict[str, str]:
        return {f.name: f.reason for f in self.features}

    def of_kind(self, *kinds: str) -> list[Feature]:
        return [f for f in self.features if f.kind in kinds]

    def event_columns(self) -> list[str]:
        """Attribute columns of the event table that the features read."""
        cols: set[str] = set()
        for f in self.features:
            for flt in (f.events, f.denominator):
                cols |= {c for c, _ in flt.where} if flt else set()
            if f.kind in {"distinct", "static", "seen_before", *STAT_KINDS}:
                cols.add(f.column)
        return sorted(cols)

    def to_json(self) -> str:
        return json.dumps(
            {
                "features": [asdict(f) for f in self.features],
                "event_types": self.event_types,
                "vocab": dict(self.vocab),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureSet:
        data = json.loads(text)

        def flt(d: dict | None) -> EventFilter | None:
            return (
                None
                if d is None
                else EventFilter(d["event_type"], tuple(tuple(w) for w in d["where"]))
            )

        feats = tuple(
            Feature(**{**f, "events": flt(f["events"]), "denominator": flt(f["denominator"])})
            for f in data["features"]
        )
        return cls(
            feats, tuple(data["event_types"]), {k: tuple(v) for k, v in data["vocab"].items()}
        )


def category_vocab(
    events: pl.DataFrame | pl.LazyFrame, columns: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """Sorted distinct values of each column: build once from training data, then keep it."""
    lf = events.lazy()
    return {
        c: tuple(sorted(lf.select(pl.col(c).drop_nulls().unique()).collect()[c].to_list()))
        for c in columns
    }


def encode_expr(col: str, vocab: tuple[str, ...]) -> pl.Expr:
    coded = pl.col(col).replace_strict(
        list(vocab), list(range(1, len(vocab) + 1)), default=0, return_dtype=pl.Int32
    )
    return pl.when(pl.col(col).is_null()).then(None).otherwise(coded).alias(col)


def encode_value(value: str | None, vocab: tuple[str, ...]) -> int | None:
    if value is None:
        return None
    return vocab.index(value) + 1 if value in vocab else 0
