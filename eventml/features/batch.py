"""The batch path: point-in-time features for many decisions at once.

One declaration, a `FeatureSet`, drives two implementations that must agree to the last bit:
- `compute_features` (here): every decision of a day, or of all days, at once. Events and
  decisions are sorted by (entity, time) once; then one merge walk (numba kernels in
  `eventml.features.kernels`) moves a pointer per window bound forward with running counts per
  event filter, so a window count is a difference of two running counts and an amount window
  is a slice of the filter's amounts, summed in numpy's own pairwise order. Distinct values
  come from each event's previous occurrence of the same value. The cost is a few passes over
  the involved entities' events plus a little work per decision and window; the walks run on
  runs of whole entities side by side, one per thread of the step's budget (`eventml.threads`).
- `features_for_one` (a live request, `eventml.features.one`): the definitions applied literally to one entity's
  history with numpy masks. Tests hold the two together, which is why the request path is a
  separate, obvious implementation rather than the batch one called with one row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from eventml.features import kernels
from eventml.features.declare import (
    KEYED_KINDS,
    STAT_KINDS,
    EventFilter,
    FeatureSet,
    encode_expr,
    window_us,
)
from eventml.features.keyed import keyed_features, require_activity
from eventml.threads import step_threads

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
    as queries sorted the same way: read and sorted once, however many numeric columns the
    walks take statistics of."""

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
        # The numeric columns the walks take statistics of (`amount`, and e.g. `days_late`).
        numeric = sorted({"amount"} | {f.column for f in fs.of_kind(*STAT_KINDS)})
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
                (type_code.cast(pl.Int32) * 2).alias("__type2"),
                *[
                    pl.col(c).cast(pl.Float64).fill_null(np.nan).alias(f"__num_{c}")
                    for c in numeric
                ],
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
        self.type2 = ev["__type2"].to_numpy()[self.perm]
        self.values = {c: ev[c].to_numpy()[self.perm] for c in value_cols}
        # Numeric values and condition words stay in input order: the kernels read them through
        # perm for the events that carry one (a walk gathers only its column's nulls to code them).
        self.numeric = {c: ev[f"__num_{c}"].to_numpy() for c in numeric}
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

    def windowed(
        self, filters: _Filters, plan: dict, value: str = "amount"
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Counts, statistics of `value` and recency of the planned features, from one walk;
        and the walk's window bounds."""
        members, where_id, where_type, where_need, is_amount = filters.tables()
        amount = self.numeric[value]
        code = self.type2 + ~np.isnan(amount[self.perm])  # 2 * type + has a value
        offsets = np.array(filters.offsets, np.int64)
        count_pairs = np.array(list(plan["count"]), np.int64).reshape(-1, 2)
        amount_pairs = np.array(list(plan["amount"]), np.int64).reshape(-1, 2)
        recency = np.array(list(plan["recency"]), np.int64)

        n_q = len(self.qe)
        bounds = np.empty((len(offsets), n_q), np.int64)
        c = np.empty((len(count_pairs), n_q), np.int32)
        s, mean, mx = (np.empty((len(amount_pairs), n_q)) for _ in range(3))
        days = np.empty((len(recency), n_q))

        def part(rows: slice, queries: slice) -> None:
            perm = self.perm[rows]
            ptr, ids = kernels.memberships(
                code[rows], self.cond, perm, members, where_id, where_type, where_need
            )
            vals, vstart = kernels.compact_amounts(ptr, ids, amount, perm, is_amount)
            kernels.walk(
                self.e[rows], self.t[rows], ptr, ids, self.qe[queries], self.qt[queries],
                offsets, count_pairs, amount_pairs, vals, vstart, recency,
                *(a[:, queries] for a in (bounds, c, s, mean, mx, days)),
            )  # fmt: skip
            bounds[:, queries] += rows.start

        self._by_parts(part)
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
                out[name] = {"sum": s, "mean": mean, "max": mx}[kind][args[0]]
        return out, bounds

    def values_seen(
        self, col: str, bounds: np.ndarray, windows: list[int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Distinct values of `col` per window (rows of the walk's `bounds`), and prior events
        with the decision's own value. Values are compared by hash within an entity, by the hash bits that an entity
        code would leave in a packed 64-bit key: two values of one entity would have to collide
        to be merged, odds of about k²/2^45 for an entity with k values."""
        same = self.own.get(f"__same_{col}")
        q_hashes = np.zeros(len(self.qt), np.uint64) if same is None else same

        distinct = np.zeros((len(windows), len(self.qt)), np.int32)
        seen = np.empty(len(self.qt))

        def part(rows: slice, queries: slice) -> None:
            kernels.distinct_and_seen(
                self.e[rows], self.values[col][rows], np.uint64(self.n_entities.bit_length()),
                bounds[:, queries] - rows.start, np.array(windows, np.int64), q_hashes[queries],
                distinct[:, queries], seen[queries],
            )  # fmt: skip

        self._by_parts(part)
        return distinct, (None if same is None else seen)

    def _by_parts(self, part: Callable[[slice, slice], None]) -> None:
        """`part(event rows, decision rows)` over runs of whole entities, about equal in events,
        one per thread of the step's budget (the kernels release the GIL); each part writes its
        own decisions' columns. An entity's features read only its own events, so the parts
        give the same bits as one walk."""
        n, n_q, threads = len(self.e), len(self.qe), step_threads()
        cuts = np.unique(self.e[np.arange(1, threads) * n // threads]) if n >= 2 * threads else []
        rows = [0, *np.searchsorted(self.e, cuts), n]
        queries = [0, *np.searchsorted(self.qe, cuts), n_q]
        parts = [(slice(rows[i], rows[i + 1]), slice(queries[i], queries[i + 1]))
                 for i in range(len(rows) - 1)]  # fmt: skip
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: part(*p), parts))  # list: a part's error raises here

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


def _plan(fs: FeatureSet, filters: _Filters, value: str = "amount") -> dict:
    """What the walk computes: (bound, filter) pairs to count and to take statistics of `value`
    over, filters to find the latest event of, and per feature where its values come from.
    The walk over `amount` computes everything else too; one over another column only the
    statistics of that column."""
    counts: dict[tuple[int, int], int] = {}
    amounts: dict[tuple[int, int], int] = {}
    recency: dict[int, int] = {}
    features: dict[str, tuple] = {}

    def count(flt: EventFilter, w: int | None) -> int:
        return counts.setdefault((filters.bound(w), filters.id(flt)), len(counts))

    for f in fs.features:
        w = window_us(f.window)
        if value != "amount" and not (f.kind in STAT_KINDS and f.column == value):
            continue
        if f.kind == "count":
            features[f.name] = ("count", count(f.events, w))
        elif f.kind == "trend":
            features[f.name] = ("trend", count(f.events, w), count(f.events, 2 * w))
        elif f.kind == "ratio":
            features[f.name] = ("ratio", count(f.events, w), count(f.denominator, w))
        elif f.kind in STAT_KINDS:
            if f.column != value:
                continue  # another column's walk
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
    events: pl.DataFrame | pl.LazyFrame,
    decisions: pl.DataFrame,
    feature_set: FeatureSet,
    activity: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per decision, in (entity, time) order: decision_id and every feature of the set.

    `events` must hold every event of the decisions' entities before the decisions (more is
    fine: other entities and later events are ignored). The work scales with the decisions and
    their entities' histories, so computing one day at a time costs one day of work; pass a
    LazyFrame scan to let the entity filter reach the storage. Keyed features (per terminal,
    per merchant) read `activity`, the keys' `key_activity` of the days before the decisions.
    """
    fs = feature_set
    if decisions.height == 0:
        return pl.DataFrame(schema={"decision_id": pl.String(), **fs.schema()})
    require_activity(fs, activity)
    filters = _Filters(fs)
    plan = _plan(fs, filters)
    b = _Batch(events, decisions, fs, filters)
    res, bounds = b.windowed(filters, plan)
    # Statistics of other numeric columns: one more walk per column, over the same events.
    for value in sorted({f.column for f in fs.of_kind(*STAT_KINDS)} - {"amount"}):
        other = _Filters(fs)
        res.update(b.windowed(other, _plan(fs, other, value), value)[0])
    for col in sorted({f.column for f in fs.of_kind("distinct", "seen_before")}):
        feats = [f for f in fs.of_kind("distinct", "seen_before") if f.column == col]
        windows = [filters.bound(window_us(f.window)) for f in feats if f.kind == "distinct"]
        distinct, same = b.values_seen(col, bounds, windows)
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
    del b  # the events' arrays go before the table is made: the peak holds one, not both
    for f in fs.features:
        if f.kind not in KEYED_KINDS:
            columns.append(pl.Series(f.name, res.pop(f.name), nan_to_null=True).cast(f.dtype))
    table = pl.DataFrame(columns)
    if fs.of_kind(*KEYED_KINDS):
        keyed = keyed_features(activity, decisions, fs)
        table = table.join(keyed, on="decision_id", how="left", maintain_order="left")
    return table.select("decision_id", *fs.names)
