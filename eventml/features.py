"""Point-in-time features per decision: aggregates of the entity's events strictly before it.

One declaration, a `FeatureSet`, drives two implementations that must agree to the last bit:
- `compute_features` (batch): every decision of a day, or of all days, at once. Events are
  sorted by (entity, time) once; each window count is then a difference of two prefix counts at
  positions found by binary search, and amount statistics are `ufunc.reduceat` over the window's
  slice, so the cost is a few passes over the involved entities' events plus a little work per
  decision. There is no loop per decision or per entity.
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
    decision_cols = config.decision_columns or ("amount", *spec.numeric)
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
    decision_cols = config.decision_columns or ("amount", *spec.numeric)
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
    only rows of the decision's entity, if given, with ts strictly before it are used)."""
    t = _ts_us(decision["ts"])
    h = history.with_columns(pl.col("ts").dt.epoch("us").alias("__t")).filter(pl.col("__t") < t)
    if "entity_id" in decision and "entity_id" in h.columns:
        h = h.filter(pl.col("entity_id") == decision["entity_id"])
    if feature_set.of_kind("static"):
        h = h.sort("__t", "event_id") if "event_id" in h.columns else h.sort("__t")
    cols = {c: h[c].to_numpy() for c in ("event_type", *feature_set.event_columns())}
    ts = h["__t"].to_numpy()
    cols["ts"] = ts
    amount = h["amount"].cast(pl.Float64).fill_null(np.nan).to_numpy()

    def since(w: str, until: int = 0) -> np.ndarray:
        wu = window_us(w)
        return (ts < t - until) & (True if wu is None else ts >= t - until - wu)

    out: dict[str, float | int | None] = {}
    for f in feature_set.features:
        if f.kind == "count":
            out[f.name] = int((f.events.mask(cols) & since(f.window)).sum())
        elif f.kind.startswith("amount_"):
            vals = amount[f.events.mask(cols) & since(f.window) & ~np.isnan(amount)]
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
            m = f.events.mask(cols)
            out[f.name] = (t - int(ts[m].max())) / US_PER_DAY if m.any() else None
        elif f.kind == "trend":
            m, w = f.events.mask(cols), window_us(f.window)
            out[f.name] = int((m & since(f.window)).sum()) - int(
                (m & since(f.window, until=w)).sum()
            )
        elif f.kind == "ratio":
            inw = since(f.window)
            den = int((f.denominator.mask(cols) & inw).sum())
            out[f.name] = int((f.events.mask(cols) & inw).sum()) / den if den else None
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
            out[f.name] = None if v is None else int((cols[f.column] == v).sum())
    return out


# --------------------------------------------------------------------------------------------
# The batch path

HASH_SEED = 0  # polars' hash is stable within one process, which is all the batch path needs


class _Packed:
    """Binary search over rows sorted by (major, minor), all queries at once.

    Both parts are packed into one int64 key, built once, so each search is a single vectorized
    `np.searchsorted`. Majors come in chunks small enough that the packed key cannot overflow
    (a chunk covers ~65k entities for a few years of microseconds)."""

    def __init__(
        self, major: np.ndarray, minor: np.ndarray, lowest: int, highest: int, n_major: int
    ):
        """`lowest`/`highest` bound every minor of rows and queries; `n_major` every major."""
        self.base, self.span = lowest, highest - lowest + 1
        self.per = max(1, (1 << 62) // self.span)
        self.chunks = []
        for m0 in range(0, n_major, self.per):
            a, b = np.searchsorted(major, [m0, m0 + self.per])
            self.chunks.append(
                (m0, int(a), (major[a:b] - m0) * self.span + (minor[a:b] - self.base))
            )
        self.n = len(major)

    def search(self, q_major: np.ndarray, q_minor: np.ndarray) -> np.ndarray:
        """Per query, the index of the first row with (major, minor) >= (q_major, q_minor)."""
        if len(self.chunks) == 1:
            m0, a, key = self.chunks[0]
            return a + np.searchsorted(key, (q_major - m0) * self.span + (q_minor - self.base))
        out = np.full(len(q_major), self.n, np.int64)
        for m0, a, key in self.chunks:
            sel = (q_major >= m0) & (q_major < m0 + self.per)
            out[sel] = a + np.searchsorted(
                key, (q_major[sel] - m0) * self.span + (q_minor[sel] - self.base)
            )
        return out


def _prefix(mask: np.ndarray) -> np.ndarray:
    """prefix[p] = number of true values before position p."""
    out = np.zeros(len(mask) + 1, np.int32)
    np.cumsum(mask, out=out[1:])
    return out


def _window_reduce(
    ufunc: np.ufunc, padded: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """ufunc over padded[lo:hi] per row (garbage where lo == hi: callers mask those); `padded`
    ends with one spare element because reduceat wants every index < len. With rows sorted by
    (entity, time) the slices between consecutive windows are disjoint, so reduceat touches
    each value about once."""
    idx = np.empty(2 * len(lo), np.int64)
    idx[0::2], idx[1::2] = lo, hi
    return ufunc.reduceat(padded, idx)[0::2]


def _time_rank(t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(order, rank) of rows by time; (None, row number) when already in time order."""
    if len(t) < 2 or bool((t[1:] >= t[:-1]).all()):
        return None, np.arange(len(t), dtype=np.uint64)
    order = np.argsort(t, kind="stable")
    rank = np.empty(len(t), np.uint64)
    rank[order] = np.arange(len(t), dtype=np.uint64)
    return order, rank


def _sort_by_entity_time(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (entity hash, time), ties in input order.

    Sorting one packed uint64 (upper 32 bits of the hash, time rank) is several times faster
    than a two-key sort. Entities whose hashes share the upper 32 bits end up interleaved in
    one bucket; those few buckets are re-sorted by the full hash afterwards."""
    order, rank = _time_rank(t)
    low = np.uint64(0xFFFFFFFF)
    key = np.sort((h & ~low) | rank)
    perm = (key & low).astype(np.int64)
    if order is not None:
        perm = order[perm]
    hs = h[perm]
    top = hs >> np.uint64(32)
    clash = np.flatnonzero((hs[1:] != hs[:-1]) & (top[1:] == top[:-1]))
    for bucket in np.unique(top[clash]):
        a, b = np.searchsorted(top, [bucket, bucket + np.uint64(1)])
        perm[a:b] = perm[a:b][np.argsort(hs[a:b], kind="stable")]
    return perm


class _Batch:
    """The involved entities' events as numpy arrays sorted by (entity, time), the decisions as
    queries sorted the same way, and the window bounds of every decision."""

    def __init__(
        self, events: pl.DataFrame | pl.LazyFrame, decisions: pl.DataFrame, fs: FeatureSet
    ):
        self.fs = fs
        entity_hash = pl.col("entity_id").hash(HASH_SEED)
        dec_h = decisions.select(entity_hash).to_series()
        where_cols = sorted(
            {
                c
                for f in fs.features
                for flt in (f.events, f.denominator)
                if flt
                for c, _ in flt.where
            }
        )
        value_cols = sorted({f.column for f in fs.of_kind("distinct", "seen_before")})
        # Strings become integers before anything moves: hashes for ids and values, codes for
        # types. Only the decisions' entities, only before the last decision: a day costs its
        # own work, and a LazyFrame scan gets the filters pushed down to storage.
        query = (
            events.lazy()
            .filter(
                pl.col("ts") < decisions["ts"].max(), entity_hash.is_in(dec_h.unique().implode())
            )
            .select(
                entity_hash.alias("__h"),
                pl.col("ts").dt.epoch("us").alias("__t"),
                pl.col("event_type").cast(pl.Enum(fs.event_types)).to_physical().alias("__y"),
                pl.col("amount").cast(pl.Float64).fill_null(np.nan),
                *[self._value_hash(c).alias(c) for c in {*where_cols, *value_cols}],
            )
        )
        try:
            ev = query.collect()
        except pl.exceptions.InvalidOperationError as e:
            raise ValueError(
                f"events have an event_type outside the feature set's {fs.event_types}; "
                f"validate them against the spec first ({e})"
            ) from None
        perm = _sort_by_entity_time(ev["__h"].to_numpy(), ev["__t"].to_numpy())
        self.cols = {c: ev[c].to_numpy()[perm] for c in ev.columns}
        h, self.t = self.cols.pop("__h"), self.cols.pop("__t")
        new = np.ones(len(h), bool)
        new[1:] = h[1:] != h[:-1]
        self.e = np.cumsum(new) - 1
        self.heads = heads = h[new]  # entity hash per entity code, ascending

        # Decisions: entity code (one past the last for an entity without events), time order.
        qh = dec_h.to_numpy()
        qe = np.zeros(len(qh), np.int64)
        if len(heads):
            pos = np.minimum(np.searchsorted(heads, qh), len(heads) - 1)
            qe = np.where(heads[pos] == qh, pos, len(heads))
        self.n_entities = len(heads) + 1
        qt = decisions["ts"].dt.epoch("us").to_numpy()
        order, rank = _time_rank(qt)
        self.q_order = (
            np.sort((qe.astype(np.uint64) << np.uint64(32)) | rank) & np.uint64(0xFFFFFFFF)
        ).astype(np.int64)
        if order is not None:
            self.q_order = order[self.q_order]
        keep = {
            "decision_id",
            *(f.column for f in fs.of_kind("decision_value", "decision_category", "seen_before")),
        }
        self.q = decisions.select(c for c in decisions.columns if c in keep | {"ts"})[self.q_order]
        self.qe, self.qt = qe[self.q_order], qt[self.q_order]

        longest = max([2 * window_us(f.window) for f in fs.features if f.window != "all"] or [0])
        lowest = min(int(self.t.min()) if len(self.t) else 0, int(self.qt.min()) - longest)
        highest = max(int(self.t.max()) if len(self.t) else 0, int(self.qt.max()))
        self.index = _Packed(self.e, self.t, lowest, highest, self.n_entities)
        self.start = np.searchsorted(self.e, self.qe, "left")
        self.hi = self.index.search(self.qe, self.qt)
        self._lo: dict[int | None, np.ndarray] = {None: self.start}
        self._prefix: dict[EventFilter, np.ndarray] = {}
        self._amounts: dict[EventFilter, tuple[np.ndarray, np.ndarray]] = {}
        self._sums: dict[tuple[EventFilter, int | None], np.ndarray] = {}

    @staticmethod
    def _value_hash(col: str) -> pl.Expr:
        # 0 stands for null so the column stays a plain uint64 array.
        return (
            pl.when(pl.col(col).is_null())
            .then(pl.lit(0, pl.UInt64))
            .otherwise(pl.col(col).hash(HASH_SEED))
        )

    def lo(self, w_us: int | None) -> np.ndarray:
        if w_us not in self._lo:
            self._lo[w_us] = self.index.search(self.qe, self.qt - w_us)
        return self._lo[w_us]

    def mask(self, f: EventFilter) -> np.ndarray:
        m = np.ones(len(self.t), bool)
        if f.event_type is not None:
            m &= self.cols["__y"] == self.fs.event_types.index(f.event_type)
        for col, value in f.where:
            m &= self.cols[col] == pl.Series([value]).hash(HASH_SEED)[0]
        return m

    def prefix(self, f: EventFilter) -> np.ndarray:
        if f not in self._prefix:
            self._prefix[f] = _prefix(self.mask(f))
        return self._prefix[f]

    def count(self, f: EventFilter, w_us: int | None) -> np.ndarray:
        c = self.prefix(f)
        return c[self.hi] - c[self.lo(w_us)]

    def amount_stat(self, kind: str, f: EventFilter, w_us: int | None) -> np.ndarray:
        if f not in self._amounts:  # (prefix count, values) of matching events with an amount
            m = self.mask(f) & ~np.isnan(self.cols["amount"])
            self._amounts[f] = (_prefix(m), np.append(self.cols["amount"][m], 0.0))
        c, vals = self._amounts[f]
        lo, hi = c[self.lo(w_us)], c[self.hi]
        n = hi - lo
        if kind == "amount_max":
            return np.where(n > 0, _window_reduce(np.maximum, vals, lo, hi), np.nan)
        if (f, w_us) not in self._sums:  # shared by sum and mean
            self._sums[f, w_us] = np.where(n > 0, _window_reduce(np.add, vals, lo, hi), 0.0)
        total = self._sums[f, w_us]
        if kind == "amount_sum":
            return total
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / n, np.nan)

    def days_since(self, f: EventFilter) -> np.ndarray:
        c = self.prefix(f)
        ts = self.t[np.diff(c).astype(bool)]
        if len(ts) == 0:
            return np.full(len(self.qt), np.nan)
        k, found = c[self.hi] - 1, c[self.hi] > c[self.start]
        return np.where(found, (self.qt - ts[np.maximum(k, 0)]) / US_PER_DAY, np.nan)

    def latest_code(self, events: pl.DataFrame | pl.LazyFrame, col: str) -> np.ndarray:
        """Vocabulary code of the latest non-null value of `col` before each decision; the
        rows that carry it (sign-ups, profile changes) are few, so they get their own sort with
        event id as the tie-break the request path uses."""
        heads = self.heads
        sub = (
            events.lazy()
            .filter(pl.col(col).is_not_null(), pl.col("ts") < self.q["ts"].max())
            .select(
                pl.col("entity_id").hash(HASH_SEED).alias("__h"),
                pl.col("ts").dt.epoch("us").alias("__t"),
                encode_expr(col, self.fs.vocab[col]).alias("__c"),
                "event_id",
            )
            .filter(pl.col("__h").is_in(pl.Series(heads).implode()))
            .sort("__h", "__t", "event_id")
            .collect()
        )
        if sub.height == 0:
            return np.full(len(self.qt), np.nan)
        e = np.searchsorted(heads, sub["__h"].to_numpy())
        t, codes = sub["__t"].to_numpy(), sub["__c"].to_numpy()
        lowest, highest = (
            min(int(t.min()), int(self.qt.min())),
            max(int(t.max()), int(self.qt.max())),
        )
        pos = _Packed(e, t, lowest, highest, self.n_entities).search(self.qe, self.qt)
        found = pos > np.searchsorted(e, self.qe, "left")
        return np.where(found, codes[np.maximum(pos - 1, 0)], np.nan)

    def values_seen(self, col: str, windows: list[int | None], same_as: pl.Series | None):
        """Distinct values of `col` per window, and prior events with the decision's own value.

        Events with a value are grouped by (entity, value); per decision and per value of its
        entity, a binary search finds the value's last occurrence before the decision, and the
        value counts in every window that holds that occurrence. Values are compared by hash
        within an entity (its top bits next to the entity code): two values of one entity would
        have to collide to be merged, odds of about k²/2^45 for an entity with k values.
        """
        n_q = len(self.qt)
        sel = np.flatnonzero(self.cols[col] != 0)
        bits = self.n_entities.bit_length()
        e, t = self.e[sel], self.t[sel]
        key = (e.astype(np.uint64) << np.uint64(64 - bits)) | (
            self.cols[col][sel] >> np.uint64(bits)
        )
        order = np.argsort(key, kind="stable")  # stable: time order survives inside each group
        key, e, t = key[order], e[order], t[order]
        if len(key) == 0:
            zeros = np.zeros(n_q, np.int64)
            same = None if same_as is None else np.where(same_as.is_null().to_numpy(), np.nan, 0.0)
            return {w: zeros for w in windows}, same
        new = np.ones(len(key), bool)
        new[1:] = key[1:] != key[:-1]
        g_start = np.flatnonzero(new)
        gid = np.cumsum(new) - 1
        g_e, g_key = e[g_start], key[g_start]
        # One row per (value of an entity, decision of that entity), in (group, time) order so
        # the binary searches below run over sorted queries (several times faster than random).
        first = np.searchsorted(self.qe, g_e, "left")
        n_dec = np.searchsorted(self.qe, g_e, "right") - first
        g = np.repeat(np.arange(len(g_e)), n_dec)
        rep = first[g] + np.arange(len(g)) - np.repeat(np.cumsum(n_dec) - n_dec, n_dec)
        t_rep = self.qt[rep]
        longest = max([w for w in windows if w] or [0])
        lowest = min(int(t.min()), int(self.qt.min()) - longest)
        highest = max(int(t.max()), int(self.qt.max()))
        pos = _Packed(gid, t, lowest, highest, int(gid[-1]) + 1).search(g, t_rep)
        before = pos - g_start[g]
        last = t[np.maximum(pos - 1, 0)]
        distinct = {}
        for w in windows:
            inside = (before > 0) if w is None else (before > 0) & (last >= t_rep - w)
            distinct[w] = np.bincount(rep, weights=inside, minlength=n_q).astype(np.int64)
        same = None
        if same_as is not None:
            qv = same_as.to_frame().select(self._value_hash(same_as.name)).to_series().to_numpy()
            q_key = (self.qe.astype(np.uint64) << np.uint64(64 - bits)) | (qv >> np.uint64(bits))
            n_same = np.bincount(
                rep, weights=np.where(g_key[g] == q_key[rep], before, 0), minlength=n_q
            )
            same = np.where(qv == 0, np.nan, n_same)
        return distinct, same


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
    b = _Batch(events, decisions, fs)
    res: dict[str, np.ndarray] = {}
    by_column: dict[str, list[Feature]] = {}
    for f in fs.features:
        w = window_us(f.window)
        if f.kind == "count":
            res[f.name] = b.count(f.events, w)
        elif f.kind.startswith("amount_"):
            res[f.name] = b.amount_stat(f.kind, f.events, w)
        elif f.kind == "days_since":
            res[f.name] = b.days_since(f.events)
        elif f.kind == "trend":
            res[f.name] = b.count(f.events, w) - (b.count(f.events, 2 * w) - b.count(f.events, w))
        elif f.kind == "ratio":
            num, den = b.count(f.events, w), b.count(f.denominator, w)
            with np.errstate(invalid="ignore", divide="ignore"):
                res[f.name] = np.where(den > 0, num / den, np.nan)
        elif f.kind == "static":
            res[f.name] = b.latest_code(events, f.column)
        elif f.kind == "decision_value":
            res[f.name] = b.q[f.column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        elif f.kind == "decision_category":
            codes = b.q.select(encode_expr(f.column, fs.vocab[f.column]))[f.column]
            res[f.name] = codes.cast(pl.Float64).fill_null(np.nan).to_numpy()
        else:  # distinct, seen_before: one pass per column serves both
            by_column.setdefault(f.column, []).append(f)
    for col, feats in by_column.items():
        windows = [window_us(f.window) for f in feats if f.kind == "distinct"]
        same_as = b.q[col] if any(f.kind == "seen_before" for f in feats) else None
        distinct, same = b.values_seen(col, windows, same_as)
        for f in feats:
            res[f.name] = distinct[window_us(f.window)] if f.kind == "distinct" else same

    columns = [b.q["decision_id"]]
    for f in fs.features:
        s = pl.Series(f.name, res[f.name])
        columns.append((s.fill_nan(None) if s.dtype.is_float() else s).cast(f.dtype))
    return pl.DataFrame(columns)
