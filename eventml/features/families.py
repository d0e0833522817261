"""Feature families: the declarative part of a dataset pack that says which features to build.

A pack lists families (windows; which event types get counts and statistics of which numeric
column; distinct and seen-before columns; static attributes; the decision's own fields; trends;
ratios) and `build_feature_set` expands them into named features such as `n_application_30d`
or `days_late_max_payment_late_90d`. Categorical columns are coded with the vocabularies the
pack declares (`categories`), so every day's partition and every live request use the same codes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from eventml.features.declare import EventFilter, Feature, FeatureSet, window_us
from eventml.schema import DatasetSpec

STATS = ("sum", "mean", "max")


class Filter(BaseModel):
    """Which events a ratio counts: one event type (none: any) and categorical equalities."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: str | None = None
    where: dict[str, str] = Field(default_factory=dict)

    def event_filter(self) -> EventFilter:
        return EventFilter(self.event_type, tuple(sorted(self.where.items())))


class Ratio(BaseModel):
    """`name`_<window>: events matching `numerator` per event matching `denominator`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    numerator: Filter
    denominator: Filter


class Statistics(BaseModel):
    """Sum, mean and max of a numeric column over the events of each type, per window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    column: str = "amount"
    event_types: tuple[str, ...]
    stats: tuple[str, ...] = STATS
    windows: tuple[str, ...] | None = None  # None: the families' windows


class Keyed(BaseModel):
    """Aggregates per value of another column than the entity (a terminal, a merchant, a
    device), over whole days before the decision's day: `<key>_n_<type>_<w>` events at the
    key, and per label `<key>_n_<label>_<w>` positives and `<key>_<label>_rate_<w>` their share
    among the key's decisions, counted only once each label has matured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    windows: tuple[str, ...] = ("7d", "30d")
    count_event_types: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


class FeatureFamilies(BaseModel):
    """Which feature families to build; every field names the pack's own columns or types."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    windows: tuple[str, ...] = ("1d", "7d", "30d", "90d", "all")
    velocity_windows: tuple[str, ...] = ("1h",)  # extra windows for the count of all events
    count_event_types: tuple[str, ...] | None = None  # None: every event type
    # None: `amount` of the decision event types.
    statistics: tuple[Statistics, ...] | None = None
    distinct_columns: tuple[str, ...] = ()
    static_columns: tuple[str, ...] = ()
    decision_columns: tuple[str, ...] | None = None  # None: amount and the input numeric columns
    seen_before_columns: tuple[str, ...] = ()
    trend_event_types: tuple[str, ...] = ()
    trend_window: str = "30d"
    ratios: tuple[Ratio, ...] = ()
    keyed: tuple[Keyed, ...] = ()


def _span(window: str) -> str:
    if window == "all":
        return "ever"
    n, unit = int(window[:-1]), {"h": "hour", "d": "day"}[window[-1]]
    return f"in the last {unit}" if n == 1 else f"in the last {n} {unit}s"


def _check_columns(spec: DatasetSpec, families: FeatureFamilies) -> None:
    """Every column a family names is an input of the spec: labels never become features."""
    where = "features"
    problems = []
    categorical = set(spec.input_categorical)
    numeric = {"amount", *spec.input_numeric}
    for key in ("distinct_columns", "static_columns", "seen_before_columns"):
        for col in getattr(families, key):
            if col not in categorical:
                problems.append(f"{where}.{key}: {col!r} is not an input categorical column")
    for i, stat in enumerate(families.statistics or ()):
        if stat.column not in numeric:
            problems.append(
                f"{where}.statistics[{i}].column: {stat.column!r} is not `amount` or an input "
                "numeric column"
            )
        if bad := [s for s in stat.stats if s not in STATS]:
            problems.append(f"{where}.statistics[{i}].stats: {bad} are not among {list(STATS)}")
    for col in families.decision_columns or ():
        if col not in categorical | numeric:
            problems.append(f"{where}.decision_columns: {col!r} is not an input column")
    for ratio in families.ratios:
        for side in ("numerator", "denominator"):
            for col in getattr(ratio, side).where:
                if col not in categorical:
                    problems.append(
                        f"{where}.ratios.{ratio.name}.{side}.where: {col!r} is not an input "
                        "categorical column"
                    )
    labels = [x.name for x in spec.labels]
    for i, keyed in enumerate(families.keyed):
        if keyed.key not in categorical:
            problems.append(
                f"{where}.keyed[{i}].key: {keyed.key!r} is not an input categorical column"
            )
        if unknown := [x for x in keyed.labels if x not in labels]:
            problems.append(f"{where}.keyed[{i}].labels: {unknown} are not labels (have {labels})")
        if unknown := [t for t in keyed.count_event_types if t not in spec.event_types]:
            problems.append(f"{where}.keyed[{i}].count_event_types: {unknown} are not event types")
        if bad := [w for w in keyed.windows if w != "all" and not w.endswith("d")]:
            problems.append(f"{where}.keyed[{i}].windows: {bad}: keyed features count whole days")
    if problems:
        raise ValueError("; ".join(problems) + " (labels and undeclared columns cannot be inputs)")


def build_feature_set(spec: DatasetSpec, families: FeatureFamilies) -> FeatureSet:
    """The feature set of a spec's families: names like n_application_30d, amount_max_payment_late_90d."""
    _check_columns(spec, families)
    types = families.count_event_types or spec.event_types
    statistics = families.statistics
    if statistics is None:
        statistics = (Statistics(event_types=spec.decision_event_types),)
    decision_cols = families.decision_columns or ("amount", *spec.input_numeric)
    windows = families.windows
    feats: list[Feature] = []
    for w in (*families.velocity_windows, *windows):
        feats.append(
            Feature(f"n_events_{w}", "count", f"events of any kind {_span(w)}", w, EventFilter())
        )
    for t in types:
        for w in windows:
            feats.append(
                Feature(f"n_{t}_{w}", "count", f"{t} events {_span(w)}", w, EventFilter(t))
            )
    for stat in statistics:
        for t in stat.event_types:
            for w in stat.windows or windows:
                for kind in stat.stats:
                    feats.append(
                        Feature(
                            f"{stat.column}_{kind}_{t}_{w}",
                            kind,
                            f"{kind} {stat.column} of {t} {_span(w)}",
                            w,
                            EventFilter(t),
                            column=stat.column,
                        )
                    )
    for col in families.distinct_columns:
        for w in windows:
            feats.append(
                Feature(f"n_distinct_{col}_{w}", "distinct", f"distinct {col} values {_span(w)}",
                        w, column=col)
            )  # fmt: skip
    for t in types:
        feats.append(
            Feature(
                f"days_since_{t}", "days_since", f"days since the latest {t}", events=EventFilter(t)
            )
        )
    for t in families.trend_event_types:
        w = families.trend_window
        window_us(w)
        feats.append(
            Feature(f"trend_{t}_{w}", "trend", f"change in {t} events, last {w} vs the {w} before",
                    w, EventFilter(t))
        )  # fmt: skip
    for ratio in families.ratios:
        num, den = ratio.numerator.event_filter(), ratio.denominator.event_filter()
        for w in windows:
            feats.append(
                Feature(f"{ratio.name}_{w}", "ratio", f"{num.label} per {den.label} {_span(w)}",
                        w, num, den)
            )  # fmt: skip
    for col in families.static_columns:
        feats.append(Feature(f"{col}_code", "static", f"{col} (latest known)", column=col))
    for col in decision_cols:
        if col in spec.categorical:
            feats.append(
                Feature(f"decision_{col}_code", "decision_category", f"{col} of this request",
                        column=col)
            )  # fmt: skip
        else:
            feats.append(
                Feature(f"decision_{col}", "decision_value", f"{col} of this request", column=col)
            )
    for col in families.seen_before_columns:
        feats.append(
            Feature(f"n_prior_same_{col}", "seen_before",
                    f"earlier events from this request's {col}", column=col)
        )  # fmt: skip
    for keyed in families.keyed:
        key = keyed.key
        for w in keyed.windows:
            for t in keyed.count_event_types:
                feats.append(
                    Feature(f"{key}_n_{t}_{w}", "key_count",
                            f"{t} events at this {key} {_span(w)} (whole days)", w, EventFilter(t),
                            column=key)
                )  # fmt: skip
            for label in keyed.labels:
                feats.append(
                    Feature(f"{key}_n_{label}_{w}", "key_positives",
                            f"known {label} cases at this {key} {_span(w)}", w, column=key,
                            label=label)
                )  # fmt: skip
                feats.append(
                    Feature(f"{key}_{label}_rate_{w}", "key_rate",
                            f"share of known {label} at this {key} {_span(w)}", w, column=key,
                            label=label)
                )  # fmt: skip
    coded = [*families.static_columns, *(c for c in decision_cols if c in spec.categorical)]
    if missing := [c for c in coded if c not in spec.categories]:
        raise ValueError(
            f"dataset pack {spec.name!r} must declare `categories` for {missing}: features code "
            "these columns, and codes learned from data would change from one day to the next"
        )
    return FeatureSet(tuple(feats), spec.event_types, {c: spec.categories[c] for c in coded})
