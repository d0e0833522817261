"""Features keyed by another column than the entity: per terminal, per merchant, per device.

A card issuer's strongest signals are often about the place, not the card: how busy a terminal
has been this week, and how many of its payments turned out to be fraud. A keyed feature counts
events per value of a key column, or the positives of a label among the decisions at that key,
over whole days. Both come from one small table, each key's **activity per day**
(`key_activity`), joined to each decision point in time:

- a decision on day D reads the days [D - w, D) of its key: complete days before its own, so
  nothing at or after the decision can reach it;
- a label counts on the day it matures (decision time + horizon), never on the day of the
  decision that carries it, so a feature learns only outcomes that were known by then. A fraud
  confirmed two weeks after a payment first moves the terminal's fraud rate two weeks later.

The activity table is also what the online store holds per key, and `keyed_features` is the one
function both the batch path and a live request call: they read the same rows the same way.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl

from eventml.features.declare import KEYED_KINDS, US_PER_DAY, FeatureSet, window_us
from eventml.labels import build_decisions

ACTIVITY_SCHEMA = {
    "key_column": pl.String(),
    "key": pl.String(),
    "day": pl.Date(),
    "measure": pl.String(),  # n_<event type>, matured_<label>, positive_<label>
    "count": pl.Int64(),
}


def window_days(window: str) -> int | None:
    """A keyed window in whole days ('7d' → 7; `FeatureSet` refuses any other); 'all' → None."""
    w = window_us(window)
    return None if w is None else w // US_PER_DAY


def lookback_days(feature_set: FeatureSet) -> int | None:
    """How many days of activity before a decision's day its keyed features read (None: all)."""
    days = [window_days(f.window) for f in feature_set.of_kind(*KEYED_KINDS)]
    return None if None in days else max(days, default=0)


def require_activity(feature_set: FeatureSet, activity: pl.DataFrame | None) -> None:
    if activity is None and (keyed := feature_set.of_kind(*KEYED_KINDS)):
        raise ValueError(
            f"features {[f.name for f in keyed][:3]}… are keyed by {keyed[0].column!r}: pass "
            "`activity`, the keys' key_activity of the days before the decisions"
        )


def _measure(f) -> str:
    if f.kind == "key_count":
        return f"n_{f.events.event_type}"
    return f"{'positive' if f.kind == 'key_positives' else 'matured'}_{f.label}"


def key_activity(
    events: pl.DataFrame | pl.LazyFrame, spec, feature_set: FeatureSet, start: date, end: date
) -> pl.DataFrame:
    """Per key column, key value and day in [start, end): the counts the keyed features sum.

    `events` must hold every event of those days, and for labels every event of the horizon
    before them (a decision maturing on `start` was made a horizon earlier, and an event label
    reads the entity's events in between); more is fine."""
    keyed = feature_set.of_kind(*KEYED_KINDS)
    if not keyed:
        return pl.DataFrame(schema=ACTIVITY_SCHEMA)
    lf, frames = events.lazy(), []
    day = pl.col("ts").dt.date().alias("day")
    in_days = day.is_between(start, end, closed="left")
    for col in sorted({f.column for f in keyed}):
        types = sorted(
            {f.events.event_type for f in keyed if f.column == col and f.kind == "key_count"}
        )
        if types:
            frames.append(
                lf.filter(in_days, pl.col(col).is_not_null(), pl.col("event_type").is_in(types))
                .group_by(pl.col(col).alias("key"), day, "event_type")
                .agg(pl.len().cast(pl.Int64).alias("count"))
                .select(pl.lit(col).alias("key_column"), "key", "day",
                        ("n_" + pl.col("event_type")).alias("measure"), "count")
                .collect()
            )  # fmt: skip
    labels = sorted({f.label for f in keyed if f.label})
    if labels:
        horizon = max(x.horizon_days for x in spec.labels if x.name in labels)
        since = _midnight(start) - timedelta(days=horizon + 1)
        window = lf.filter(pl.col("ts") >= since, pl.col("ts") < _midnight(end)).collect()
        decisions = build_decisions(window, spec, as_of=_midnight(end))
        for col in sorted({f.column for f in keyed if f.label}):
            for label in sorted({f.label for f in keyed if f.column == col and f.label}):
                known = decisions.filter(
                    pl.col(label).is_not_null(), pl.col(col).is_not_null()
                ).select(
                    pl.col(col).alias("key"),
                    pl.col(f"{label}_matures_at").dt.date().alias("day"),
                    pl.col(label).cast(pl.Int64),
                )
                per_day = known.filter(pl.col("day").is_between(start, end, closed="left"))
                per_day = per_day.group_by("key", "day").agg(
                    pl.len().cast(pl.Int64).alias(f"matured_{label}"),
                    pl.col(label).sum().alias(f"positive_{label}"),
                )
                frames.append(
                    per_day.unpivot(index=["key", "day"], variable_name="measure",
                                    value_name="count")
                    .select(pl.lit(col).alias("key_column"), "key", "day", "measure", "count")
                )  # fmt: skip
    out = pl.concat([f.cast(ACTIVITY_SCHEMA) for f in frames]) if frames else None
    if out is None:
        return pl.DataFrame(schema=ACTIVITY_SCHEMA)
    return out.filter(pl.col("count") > 0).sort("key_column", "key", "day", "measure")


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


def keyed_features(
    activity: pl.DataFrame, decisions: pl.DataFrame, feature_set: FeatureSet
) -> pl.DataFrame:
    """decision_id and every keyed feature of the set (in the decisions' order), from the
    activity of the days before each decision's day.

    A decision without a key value gets nulls; a key with no activity in the window gets 0 counts
    and a null rate (no matured decision to rate)."""
    keyed = feature_set.of_kind(*KEYED_KINDS)
    queries = decisions.select(
        "decision_id",
        (pl.col("ts").dt.date() - pl.duration(days=1)).alias("__last"),
        *sorted({f.column for f in keyed}),
    ).with_row_index("__row")
    out = queries.select("__row", "decision_id")
    for col in sorted({f.column for f in keyed}):
        feats = [f for f in keyed if f.column == col]
        measures = sorted(
            {_measure(f) for f in feats}
            | {f"{side}_{f.label}" for f in feats if f.label for side in ("matured", "positive")}
        )
        # Running totals per key by day: a window's count is the difference of two lookups.
        running = _running(activity, col, measures)
        probe = queries.select("__row", "__last", pl.col(col).alias("key"))

        totals = _totals(probe, running, measures, 0, "")
        for w in {window_days(f.window) for f in feats}:
            table = totals.join(_totals(probe, running, measures, w, "__before"), on="__row")
            n = {m: pl.col(m) - pl.col(m + "__before") for m in measures}
            exprs = []
            for f in (f for f in feats if window_days(f.window) == w):
                if f.kind == "key_rate":
                    rate = n[f"positive_{f.label}"].cast(pl.Float64) / n[f"matured_{f.label}"]
                    value = pl.when(n[f"matured_{f.label}"] > 0).then(rate)
                else:
                    value = n[_measure(f)]
                exprs.append(value.cast(f.dtype).alias(f.name))
            out = out.join(table.select("__row", *exprs), on="__row", how="left")
        # No key, no keyed features (a null never matches a key in the joins above either).
        missing = pl.col("__row").is_in(queries.filter(pl.col(col).is_null())["__row"].implode())
        out = out.with_columns(pl.when(~missing).then(pl.col(f.name)).alias(f.name) for f in feats)
    return out.sort("__row").select("decision_id", *[f.name for f in keyed])


def _totals(probe, running, measures, days_back: int | None, tag: str) -> pl.DataFrame:
    """Each decision's running totals as of `days_back` days before its last day (0: through
    its last day; None, for 'all': nothing, the start of time)."""
    if days_back is None:
        return probe.select("__row", *[pl.lit(0, pl.Int64).alias(m + tag) for m in measures])
    at = probe.with_columns((pl.col("__last") - pl.duration(days=days_back)).alias("__at"))
    hit = at.sort("__at").join_asof(
        running, left_on="__at", right_on="day", by="key", strategy="backward",
        check_sortedness=False,
    )  # fmt: skip
    return hit.select("__row", *[pl.col(m).fill_null(0).alias(m + tag) for m in measures])


def _running(activity: pl.DataFrame, col: str, measures: list[str]) -> pl.DataFrame:
    """Per key and day with activity: each measure's total over that day and all before it."""
    wide = (
        activity.filter(pl.col("key_column") == col, pl.col("measure").is_in(measures))
        .group_by("key", "day")
        .agg(pl.col("count").filter(pl.col("measure") == m).sum().alias(m) for m in measures)
        .sort("key", "day")
    )
    return wide.with_columns(pl.col(m).cum_sum().over("key") for m in measures).sort("day")
