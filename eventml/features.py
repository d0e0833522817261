"""Point-in-time features per decision: aggregates of the entity's events strictly before it.

One declaration, a `FeatureSet`, drives two implementations that must agree to the last bit:
- `compute_features` (batch): every decision of a day, or of all days, at once. Events and
  decisions are sorted by (entity, time) once; then one merge walk (numba kernels in
  `eventml._window_kernels`) moves a pointer per window bound forward with running counts per
  event filter, so a window count is a difference of two running counts and an amount window
  is a slice of the filter's amounts, summed in numpy's own pairwise order. Distinct values
  come from each event's previous occurrence of the same value. The cost is a few passes over
  the involved entities' events plus a little work per decision and window.
- `features_for_one` (a live request): the definitions applied literally to one entity's
  history with numpy masks. Tests hold the two together, which is why the request path is a
  separate, obvious implementation rather than the batch one called with one row.

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
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import polars as pl

from eventml import _window_kernels as kernels
from eventml.schema import DatasetSpec

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR

Kind = Literal[
    "count",  # events matching `events` in the window
    "amount_sum",  # sum of their non-null amounts (0 when none)
    "amount_mean",  # mean of their non-null amounts (null when none)
    "amount_max",  # max of their non-null amounts (null when none)
    "distinct",  # distinct non-null values of `column` in the window
    "days_since",  # days since the latest matching event (null when none)
    "trend",  # matching events in [t-w, t) minus those in [t-2w, t-w)
    "ratio",  # count(events) / count(denominator) in the window (null when the latter is 0)
    "static",  # latest non-null value of `column` before t, as a vocabulary code
    "decision_value",  # the decision event's own numeric attribute
    "decision_category",  # the decision event's own categorical attribute, as a vocabulary code
    "seen_before",  # prior events carrying the decision's own value of `column` (e.g. its device)
]
FLOAT_KINDS = {"amount_sum", "amount_mean", "amount_max", "days_since", "ratio", "decision_value"}
WINDOWED_KINDS = {"count", "amount_sum", "amount_mean", "amount_max", "distinct", "trend", "ratio"}


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
            needs_events = f.kind in WINDOWED_KINDS - {"distinct"} or f.kind == "days_since"
            if needs_events and f.events is None:
                raise ValueError(f"feature {f.name!r}: kind {f.kind!r} needs `events`")
            if f.kind == "ratio" and f.denominator is None:
                raise ValueError(f"feature {f.name!r}: kind 'ratio' needs `denominator`")
            needs_col = {"distinct", "static", "decision_value", "decision_category", "seen_before"}
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
            if f.kind in {"distinct", "static", "seen_before"}:
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


# --------------------------------------------------------------------------------------------
# Declaring a feature set


@dataclass(frozen=True)
class FeatureConfig:
    """Which feature families to generate for a spec; every field names spec columns or types."""

    windows: tuple[str, ...] = ("1d", "7d", "30d", "90d", "all")
    velocity_windows: tuple[str, ...] = ("1h",)  # extra windows for the count of all events
    count_event_types: tuple[str, ...] | None = None  # None: every type in the spec
    amount_event_types: tuple[str, ...] | None = None  # None: the spec's decision event types
    distinct_columns: tuple[str, ...] = ()
    static_columns: tuple[str, ...] = ()
    decision_columns: tuple[str, ...] | None = None  # None: amount and the spec's numeric columns
    seen_before_columns: tuple[str, ...] = ()
    trend_event_types: tuple[str, ...] = ()
    trend_window: str = "30d"
    # (name stem, numerator, denominator): e.g. the share of past applications approved.
    ratios: tuple[tuple[str, EventFilter, EventFilter], ...] = ()


# The lending world: policy outcomes of past applications, lateness trending up, new devices.
LENDING_FEATURES = FeatureConfig(
    amount_event_types=(
        "application",
        "payment_on_time",
        "payment_late",
        "payment_missed",
        "chargeback",
    ),
    distinct_columns=("device_id", "merchant_category"),
    static_columns=("region", "age_band", "income_band"),
    decision_columns=("amount", "term_months", "merchant_category", "channel"),
    seen_before_columns=("device_id",),
    trend_event_types=("payment_late", "payment_missed", "application"),
    ratios=(
        (
            "approval_rate",
            EventFilter("application", (("policy_decision", "approve"),)),
            EventFilter("application"),
        ),
    ),
)


def _span(window: str) -> str:
    if window == "all":
        return "ever"
    n, unit = int(window[:-1]), {"h": "hour", "d": "day"}[window[-1]]
    return f"in the last {unit}" if n == 1 else f"in the last {n} {unit}s"


def build_feature_set(
    spec: DatasetSpec, vocab: Mapping[str, tuple[str, ...]], config: FeatureConfig = FeatureConfig()
) -> FeatureSet:
    """The feature set for a spec: names like n_application_30d, amount_max_payment_late_90d."""
    for col in (*config.distinct_columns, *config.static_columns, *config.seen_before_columns):
        if col not in spec.categorical:
            raise ValueError(f"{col!r} is not a categorical column of spec {spec.name!r}")
    types = config.count_event_types or spec.event_types
    amount_types = config.amount_event_types or spec.decision_event_types
    decision_cols = config.decision_columns or ("amount", *spec.input_numeric)
    feats: list[Feature] = []
    for w in (*config.velocity_windows, *config.windows):
        feats.append(
            Feature(f"n_events_{w}", "count", f"events of any kind {_span(w)}", w, EventFilter())
        )
    for t in types:
        for w in config.windows:
            feats.append(
                Feature(f"n_{t}_{w}", "count", f"{t} events {_span(w)}", w, EventFilter(t))
            )
    for t in amount_types:
        for w in config.windows:
            for stat in ("sum", "mean", "max"):
                feats.append(
                    Feature(
                        f"amount_{stat}_{t}_{w}",
                        f"amount_{stat}",
                        f"{stat} amount of {t} {_span(w)}",
                        w,
                        EventFilter(t),
                    )
                )
    for col in config.distinct_columns:
        for w in config.windows:
            feats.append(
                Feature(
                    f"n_distinct_{col}_{w}",
                    "distinct",
                    f"distinct {col} values {_span(w)}",
                    w,
                    column=col,
                )
            )
    for t in types:
        feats.append(
            Feature(
                f"days_since_{t}", "days_since", f"days since the latest {t}", events=EventFilter(t)
            )
        )
    for t in config.trend_event_types:
        w = config.trend_window
        feats.append(
            Feature(
                f"trend_{t}_{w}",
                "trend",
                f"change in {t} events, last {w} vs the {w} before",
                w,
                EventFilter(t),
            )
        )
    for stem, num, den in config.ratios:
        for w in config.windows:
            feats.append(
                Feature(
                    f"{stem}_{w}", "ratio", f"{num.label} per {den.label} {_span(w)}", w, num, den
                )
            )
    for col in config.static_columns:
        feats.append(Feature(f"{col}_code", "static", f"{col} (latest known)", column=col))
    for col in decision_cols:
        if col in spec.categorical:
            feats.append(
                Feature(
                    f"decision_{col}_code",
                    "decision_category",
                    f"{col} of this request",
                    column=col,
                )
            )
        else:
            feats.append(
                Feature(f"decision_{col}", "decision_value", f"{col} of this request", column=col)
            )
    for col in config.seen_before_columns:
        feats.append(
            Feature(
                f"n_prior_same_{col}",
                "seen_before",
                f"earlier events from this request's {col}",
                column=col,
            )
        )
    return FeatureSet(tuple(feats), spec.event_types, {c: tuple(vocab[c]) for c in vocab})


# Each source's feature families; a source without an entry gets the generic FeatureConfig().
FEATURE_CONFIGS: dict[str, FeatureConfig] = {"lending_sim": LENDING_FEATURES}


def feature_set_for(spec: DatasetSpec, config: FeatureConfig | None = None) -> FeatureSet:
    """The feature set of a source, coding categoricals with the vocabularies its spec declares
    (`categories`), so every day's partition and every live request use the same codes."""
    config = config or FEATURE_CONFIGS.get(spec.name, FeatureConfig())
    decision_cols = config.decision_columns or ("amount", *spec.input_numeric)
    coded = [*config.static_columns, *(c for c in decision_cols if c in spec.categorical)]
    missing = [c for c in coded if c not in spec.categories]
    if missing:
        raise ValueError(
            f"dataset spec {spec.name!r} must declare `categories` for {missing}: features code "
            "these columns, and codes learned from data would change from one day to the next"
        )
    return build_feature_set(spec, {c: spec.categories[c] for c in coded}, config)


# --------------------------------------------------------------------------------------------
# The request path: definitions applied literally to one history


def _ts_us(value: datetime | int) -> int:
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return int(value)


def features_for_one(history: pl.DataFrame, decision: Mapping, feature_set: FeatureSet) -> dict:
    """Features for one live decision from its entity's events (any order, any extra rows:
    only rows of the decision's entity, if given, with ts strictly before it are used).

    Plain numpy on the history's columns: a request's history is a few hundred rows, where each
    Polars call's fixed cost would dominate. Masks are memoized per call, as many features share
    a window or an event filter."""
    t = _ts_us(decision["ts"])
    all_ts = history["ts"].dt.epoch("us").to_numpy()
    keep = all_ts < t
    if "entity_id" in decision and "entity_id" in history.columns:
        entity = decision["entity_id"]
        # A null entity matches nothing (a comparison with null is null, as in Polars).
        keep &= False if entity is None else history["entity_id"].to_numpy() == entity
    rows = np.flatnonzero(keep)
    ts = all_ts[rows]
    if feature_set.of_kind("static"):
        # Latest values need the time order; ties go by event_id, nulls first as Polars sorts.
        keys = [ts]
        if "event_id" in history.columns:
            ids = history["event_id"].to_numpy()[rows]
            no_id = np.array([v is None for v in ids], dtype=bool)
            ids[no_id] = ""
            keys = [ids, ~no_id, ts]
        order = np.lexsort(keys)
        rows, ts = rows[order], ts[order]
    cols = {c: history[c].to_numpy()[rows] for c in ("event_type", *feature_set.event_columns())}
    cols["ts"] = ts
    amount = history["amount"].cast(pl.Float64).to_numpy()[rows]  # null → NaN
    has_amount = ~np.isnan(amount)
    windows: dict[tuple[str, int], np.ndarray] = {}
    filters: dict[EventFilter, np.ndarray] = {}

    def since(w: str, until: int = 0) -> np.ndarray:
        if (w, until) not in windows:
            wu = window_us(w)
            windows[w, until] = (ts < t - until) & (True if wu is None else ts >= t - until - wu)
        return windows[w, until]

    def matching(flt: EventFilter) -> np.ndarray:
        if flt not in filters:
            filters[flt] = flt.mask(cols)
        return filters[flt]

    def n(mask: np.ndarray) -> int:  # count_nonzero: a bool sum without the ufunc machinery
        return int(np.count_nonzero(mask))

    out: dict[str, float | int | None] = {}
    for f in feature_set.features:
        if f.kind == "count":
            out[f.name] = n(matching(f.events) & since(f.window))
        elif f.kind.startswith("amount_"):
            vals = amount[matching(f.events) & since(f.window) & has_amount]
            if f.kind == "amount_sum":
                out[f.name] = float(vals.sum())
            elif len(vals) == 0:
                out[f.name] = None
            else:
                out[f.name] = float(
                    vals.sum() / len(vals) if f.kind == "amount_mean" else vals.max()
                )
        elif f.kind == "distinct":
            vals = cols[f.column][since(f.window)]
            out[f.name] = len({v for v in vals if v is not None})
        elif f.kind == "days_since":
            m = matching(f.events)
            out[f.name] = (t - int(ts[m].max())) / US_PER_DAY if m.any() else None
        elif f.kind == "trend":
            m, w = matching(f.events), window_us(f.window)
            out[f.name] = n(m & since(f.window)) - n(m & since(f.window, until=w))
        elif f.kind == "ratio":
            inw = since(f.window)
            den = n(matching(f.denominator) & inw)
            out[f.name] = n(matching(f.events) & inw) / den if den else None
        elif f.kind == "static":
            known = [v for v in cols[f.column] if v is not None]
            out[f.name] = encode_value(known[-1], feature_set.vocab[f.column]) if known else None
        elif f.kind == "decision_value":
            v = decision.get(f.column)
            out[f.name] = None if v is None else float(v)
        elif f.kind == "decision_category":
            out[f.name] = encode_value(decision.get(f.column), feature_set.vocab[f.column])
        elif f.kind == "seen_before":
            v = decision.get(f.column)
            out[f.name] = None if v is None else n(cols[f.column] == v)
    return out


# --------------------------------------------------------------------------------------------
# The batch path

HASH_SEED = 0  # polars' hash is stable within one process, which is all the batch path needs


def _time_rank(t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(order, rank) of rows by time; (None, row number) when already in time order."""
    if len(t) < 2 or bool((t[1:] >= t[:-1]).all()):
        return None, np.arange(len(t), dtype=np.uint64)
    order = np.argsort(t, kind="stable")
    rank = np.empty(len(t), np.uint64)
    rank[order] = np.arange(len(t), dtype=np.uint64)
    return order, rank


def _value_hash(col: str) -> pl.Expr:
    # 0 stands for null so the column stays a plain uint64 array.
    return (
        pl.when(pl.col(col).is_null())
        .then(pl.lit(0, pl.UInt64))
        .otherwise(pl.col(col).hash(HASH_SEED))
    )


class _Filters:
    """The event filters of a feature set, numbered for the kernels, and the window bounds.

    A filter counts either all its events or, for amount statistics, those with an amount.
    Filters on type alone are looked up by the event's code (2 * type + has amount); filters
    with `where` conditions also test bits of the event's condition word, one bit per distinct
    (column, value) condition."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        self.ids: dict[tuple[EventFilter, bool], int] = {}
        self.offsets: list[int] = [0, kernels.ALL]  # the decision itself, the entity's start
        self.conditions = sorted({c for f in fs.features for flt in (f.events, f.denominator)
                                  if flt for c in flt.where})  # fmt: skip
        if len(self.conditions) > 64:
            raise ValueError(
                f"the feature set has {len(self.conditions)} distinct `where` conditions; "
                "the batch path supports up to 64"
            )

    def id(self, flt: EventFilter, amount: bool = False) -> int:
        return self.ids.setdefault((flt, amount), len(self.ids))

    def bound(self, w_us: int | None) -> int:
        """Row of the window start [t - w, ...) in the kernels' bounds."""
        off = kernels.ALL if w_us is None else w_us
        if off not in self.offsets:
            self.offsets.append(off)
        return self.offsets.index(off)

    def condition_bits(self) -> pl.Expr:
        word = pl.lit(0, pl.UInt64)
        for j, (col, value) in enumerate(self.conditions):
            hit = (pl.col(col) == value).fill_null(False).cast(pl.UInt64)
            word = word + hit * pl.lit(1 << j, pl.UInt64)
        return word

    def tables(self) -> tuple[np.ndarray, ...]:
        """The kernels' view of the filters: plain filters per event code, the where-filters
        (id, 2 * type + needs an amount, condition bits), and which ids are amount filters."""
        types = self.fs.event_types
        plain = [[] for _ in range(2 * len(types))]
        where_id, where_type, where_need = [], [], []
        for (flt, amount), i in self.ids.items():
            y = -1 if flt.event_type is None else types.index(flt.event_type)
            if flt.where:
                where_id.append(i)
                where_type.append(2 * y + amount)
                where_need.append(sum(1 << self.conditions.index(c) for c in flt.where))
                continue
            for code in range(len(plain)):
                if y in (-1, code >> 1) and (code & 1 or not amount):
                    plain[code].append(i)
        members = np.full((len(plain), max(map(len, plain), default=0) or 1), -1, np.int64)
        for code, ids in enumerate(plain):
            members[code, : len(ids)] = ids
        is_amount = np.array([amount for _, amount in self.ids], np.bool_)
        return (
            members,
            np.array(where_id, np.int64),
            np.array(where_type, np.int64),
            np.array(where_need, np.uint64),
            is_amount,
        )


class _Batch:
    """The involved entities' events as numpy arrays sorted by (entity, time), and the decisions
    as queries sorted the same way."""

    def __init__(
        self,
        events: pl.DataFrame | pl.LazyFrame,
        decisions: pl.DataFrame,
        fs: FeatureSet,
        filters: _Filters,
    ):
        self.fs, self.ts_max = fs, decisions["ts"].max()
        entity_hash = pl.col("entity_id").hash(HASH_SEED)
        dec_h = decisions.select(entity_hash).to_series()
        value_cols = sorted({f.column for f in fs.of_kind("distinct", "seen_before")})
        amount = pl.col("amount").cast(pl.Float64).fill_null(np.nan)
        type_code = pl.col("event_type").cast(pl.Enum(fs.event_types)).to_physical()
        # Strings become integers before anything moves: hashes for ids and values, codes for
        # types. Only the decisions' entities, only before the last decision: a day costs its
        # own work, and a LazyFrame scan gets the filters pushed down to storage.
        query = (
            events.lazy()
            .filter(pl.col("ts") < self.ts_max, entity_hash.is_in(dec_h.unique().implode()))
            .select(
                entity_hash.alias("__h"),
                pl.col("ts").dt.epoch("us").alias("__t"),
                (type_code.cast(pl.Int32) * 2 + amount.is_not_nan().cast(pl.Int32)).alias("__code"),
                amount.alias("__amount"),
                *([filters.condition_bits().alias("__cond")] if filters.conditions else []),
                *[_value_hash(c).alias(c) for c in value_cols],
            )
        )
        try:
            ev = query.collect()
        except pl.exceptions.InvalidOperationError as e:
            raise ValueError(
                f"events have an event_type outside the feature set's {fs.event_types}; "
                f"validate them against the spec first ({e})"
            ) from None
        # Entities in hash order (the decisions' entities without events last), then time.
        qh = dec_h.to_numpy()
        heads = np.unique(qh)
        t = ev["__t"].to_numpy()
        in_time_order = len(t) < 2 or bool((t[1:] >= t[:-1]).all())
        order = np.empty(0, np.int64) if in_time_order else np.argsort(t, kind="stable")
        self.perm, counts = kernels.entity_sort(ev["__h"].to_numpy(), heads, order)
        has = counts > 0
        self.heads = heads[has]  # entity hash per entity code, ascending
        self.n_entities = len(self.heads) + 1
        self.e = np.repeat(np.arange(len(self.heads)), counts[has])
        self.t = t[self.perm]
        self.code = ev["__code"].to_numpy()[self.perm]
        self.values = {c: ev[c].to_numpy()[self.perm] for c in value_cols}
        # Amounts and condition words stay in input order: the kernels read them through perm
        # for the events that carry one, rather than moving every row.
        self.amount = ev["__amount"].to_numpy()
        self.cond = ev["__cond"].to_numpy() if filters.conditions else np.zeros(0, np.uint64)

        # Decisions: entity code (one past the last for an entity without events), time order.
        qe = np.where(has, np.cumsum(has) - 1, len(self.heads))[np.searchsorted(heads, qh)]
        qt = decisions["ts"].dt.epoch("us").to_numpy()
        order, rank = _time_rank(qt)
        q_order = (
            np.sort((qe.astype(np.uint64) << np.uint64(32)) | rank) & np.uint64(0xFFFFFFFF)
        ).astype(np.int64)
        if order is not None:
            q_order = order[q_order]
        self.qe, self.qt = qe[q_order], qt[q_order]
        self.decision_id = decisions["decision_id"].gather(q_order)
        # The decisions' own columns, in the form the features want.
        own = decisions.select(
            *[pl.col(f.column).cast(pl.Float64).fill_null(np.nan).alias(f.name)
              for f in fs.of_kind("decision_value")],
            *[encode_expr(f.column, fs.vocab[f.column]).cast(pl.Float64).fill_null(np.nan)
              .alias(f.name) for f in fs.of_kind("decision_category")],
            *[_value_hash(f.column).alias(f"__same_{f.column}") for f in fs.of_kind("seen_before")],
        )  # fmt: skip
        self.own = {c: own[c].to_numpy()[q_order] for c in own.columns}

    def windowed(self, filters: _Filters, plan: dict) -> dict[str, np.ndarray]:
        """Counts, amount statistics and recency of the planned features, from one walk."""
        members, where_id, where_type, where_need, is_amount = filters.tables()
        ptr, ids = kernels.memberships(
            self.code, self.cond, self.perm, members, where_id, where_type, where_need
        )
        vals, vstart = kernels.compact_amounts(ptr, ids, self.amount, self.perm, is_amount)
        counts, amounts, recency = plan["count"], plan["amount"], plan["recency"]
        self.bounds, c, s, mean, mx, days = kernels.walk(
            self.e, self.t, ptr, ids, self.qe, self.qt, np.array(filters.offsets, np.int64),
            np.array(list(counts), np.int64).reshape(-1, 2),
            np.array(list(amounts), np.int64).reshape(-1, 2),
            vals, vstart, np.array(list(recency), np.int64),
        )  # fmt: skip
        out = {}
        for name, (kind, *args) in plan["features"].items():
            if kind == "count":
                out[name] = c[args[0]]
            elif kind == "trend":  # [t-w, t) minus [t-2w, t-w)
                inner, outer = c[args[0]], c[args[1]]
                out[name] = inner - (outer - inner)
            elif kind == "ratio":
                num, den = c[args[0]], c[args[1]]
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[name] = np.where(den > 0, num / den, np.nan)
            elif kind == "days_since":
                out[name] = days[args[0]]
            else:
                out[name] = {"amount_sum": s, "amount_mean": mean, "amount_max": mx}[kind][args[0]]
        return out

    def values_seen(self, col: str, windows: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Distinct values of `col` per window (bound rows), and prior events with the decision's
        own value. Values are compared by hash within an entity, by the hash bits that an entity
        code would leave in a packed 64-bit key: two values of one entity would have to collide
        to be merged, odds of about k²/2^45 for an entity with k values."""
        same = self.own.get(f"__same_{col}")
        distinct, seen = kernels.distinct_and_seen(
            self.e,
            self.values[col],
            np.uint64(self.n_entities.bit_length()),
            self.bounds,
            np.array(windows, np.int64),
            np.zeros(len(self.qt), np.uint64) if same is None else same,
        )
        return distinct, (None if same is None else seen)

    def latest_codes(self, events: pl.DataFrame | pl.LazyFrame, cols: list[str]) -> np.ndarray:
        """Vocabulary code of the latest non-null value of each column before each decision;
        the rows that carry one (sign-ups, profile changes) are few, so they get their own sort
        with event id as the tie-break the request path uses."""
        sub = (
            events.lazy()
            .filter(
                pl.any_horizontal(pl.col(c).is_not_null() for c in cols),
                pl.col("ts") < self.ts_max,
            )
            .select(
                pl.col("entity_id").hash(HASH_SEED).alias("__h"),
                pl.col("ts").dt.epoch("us").alias("__t"),
                *[encode_expr(c, self.fs.vocab[c]).fill_null(-1).alias(c) for c in cols],
                "event_id",
            )
            .filter(pl.col("__h").is_in(pl.Series(self.heads).implode()))
            .sort("__h", "__t", "event_id")
            .collect()
        )
        e = np.searchsorted(self.heads, sub["__h"].to_numpy())
        codes = (
            np.stack([sub[c].to_numpy() for c in cols])
            if sub.height
            else np.zeros((len(cols), 0), np.int32)
        )
        return kernels.latest(e, sub["__t"].to_numpy(), codes, self.qe, self.qt)


def _plan(fs: FeatureSet, filters: _Filters) -> dict:
    """What the walk computes: (bound, filter) pairs to count and to take amount statistics
    over, filters to find the latest event of, and per feature where its values come from."""
    counts: dict[tuple[int, int], int] = {}
    amounts: dict[tuple[int, int], int] = {}
    recency: dict[int, int] = {}
    features: dict[str, tuple] = {}

    def count(flt: EventFilter, w: int | None) -> int:
        return counts.setdefault((filters.bound(w), filters.id(flt)), len(counts))

    for f in fs.features:
        w = window_us(f.window)
        if f.kind == "count":
            features[f.name] = ("count", count(f.events, w))
        elif f.kind == "trend":
            features[f.name] = ("trend", count(f.events, w), count(f.events, 2 * w))
        elif f.kind == "ratio":
            features[f.name] = ("ratio", count(f.events, w), count(f.denominator, w))
        elif f.kind.startswith("amount_"):
            key = (filters.bound(w), filters.id(f.events, amount=True))
            features[f.name] = (f.kind, amounts.setdefault(key, len(amounts)))
        elif f.kind == "days_since":
            features[f.name] = (
                "days_since",
                recency.setdefault(filters.id(f.events), len(recency)),
            )
        elif f.kind == "distinct":
            filters.bound(w)  # the distinct kernel reads this bound from the walk
    return {"count": counts, "amount": amounts, "recency": recency, "features": features}


def compute_features(
    events: pl.DataFrame | pl.LazyFrame, decisions: pl.DataFrame, feature_set: FeatureSet
) -> pl.DataFrame:
    """One row per decision, in (entity, time) order: decision_id and every feature of the set.

    `events` must hold every event of the decisions' entities before the decisions (more is
    fine: other entities and later events are ignored). The work scales with the decisions and
    their entities' histories, so computing one day at a time costs one day of work; pass a
    LazyFrame scan to let the entity filter reach the storage.
    """
    fs = feature_set
    if decisions.height == 0:
        return pl.DataFrame(schema={"decision_id": pl.String(), **fs.schema()})
    filters = _Filters(fs)
    plan = _plan(fs, filters)
    b = _Batch(events, decisions, fs, filters)
    res = b.windowed(filters, plan)
    for col in sorted({f.column for f in fs.of_kind("distinct", "seen_before")}):
        feats = [f for f in fs.of_kind("distinct", "seen_before") if f.column == col]
        windows = [filters.bound(window_us(f.window)) for f in feats if f.kind == "distinct"]
        distinct, same = b.values_seen(col, windows)
        for f in feats:
            res[f.name] = (
                same
                if f.kind == "seen_before"
                else distinct[windows.index(filters.bound(window_us(f.window)))]
            )
    static = sorted({f.column for f in fs.of_kind("static")})
    if static:
        codes = b.latest_codes(events, static)
        for f in fs.of_kind("static"):
            res[f.name] = codes[static.index(f.column)]
    for f in fs.of_kind("decision_value", "decision_category"):
        res[f.name] = b.own[f.name]

    columns = [b.decision_id]
    for f in fs.features:
        columns.append(pl.Series(f.name, res[f.name], nan_to_null=True).cast(f.dtype))
    return pl.DataFrame(columns)
