"""Decision points and their labels, with the time each label becomes known.

A decision is an event of one of the spec's decision types (a loan application). Each label is
known only once its horizon has passed: an `event_within` label asks whether an event of the
target type happens to the same entity in (ts, ts + horizon] — with a 90-day horizon, one on day 90 counts,
one on day 91 does not — and a `column` label is read off the decision event but still waits for
its horizon (a fraud flag that arrives later). Until then the label is null and `L_matured` is
false, so an early positive cannot bias training towards outcomes that happen fast.

`as_of` is the data's "now" (normally the latest event time available), never the wall clock,
so rebuilding from the same events gives the same table.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from eventml.schema import DatasetSpec, Label


def _label_value(decisions: pl.DataFrame, events: pl.DataFrame, label: Label) -> pl.Series:
    """1/0 per decision (input order), before maturity and applicability are applied."""
    if label.kind == "column":
        return (decisions[label.column] != 0).cast(pl.Int8)
    return event_within(decisions, events, label.event_type, label.horizon_days)


def event_within(
    decisions: pl.DataFrame, events: pl.DataFrame, event_type: str, horizon_days: float
) -> pl.Series:
    """Int8 per decision (input order): 1 if the entity has an `event_type` event in
    (ts, ts + horizon_days], else 0, whether or not that span has passed yet."""
    targets = (
        events.lazy()
        .filter(pl.col("event_type") == event_type)
        .select("entity_id", pl.col("ts").alias("__target_ts"))
        .sort("__target_ts")
        .collect()
    )
    # The first target event strictly after the decision; inside the horizon means positive.
    first_after = (
        decisions.select("entity_id", "ts")
        .with_row_index("__row")
        .sort("ts")
        .join_asof(targets, left_on="ts", right_on="__target_ts", by="entity_id",
                   strategy="forward", allow_exact_matches=False, check_sortedness=False)
        .sort("__row")
    )  # fmt: skip
    hit = pl.col("__target_ts") <= pl.col("ts") + pl.duration(days=horizon_days)
    return first_after.select(hit.fill_null(False).cast(pl.Int8)).to_series()


def build_decisions(
    events: pl.DataFrame, spec: DatasetSpec, as_of: datetime | None = None
) -> pl.DataFrame:
    """Every decision point the spec declares, with its labels and their maturity.

    Columns: decision_id (the event id), entity_id, ts, event_type, amount, the spec's
    categorical and numeric attributes of the decision event, then per label `L` (Int8 1/0;
    null when the label does not apply or has not matured), `L_matures_at` (ts + horizon) and
    `L_matured` (matures_at <= as_of), then the spec's oracle columns.
    `as_of` defaults to the latest event time in `events`.
    """
    as_of = as_of or events["ts"].max() or spec.source_start
    decisions = events.filter(pl.col("event_type").is_in(list(spec.decision_event_types))).select(
        pl.col("event_id").alias("decision_id"), "entity_id", "ts", "event_type", "amount",
        *spec.categorical, *spec.numeric, *spec.oracle_columns,
    )  # fmt: skip
    exprs: list[pl.Expr] = []
    for label in spec.labels:
        matures_at = pl.col("ts") + pl.duration(days=label.horizon_days)
        applies = pl.lit(True)
        for col, value in label.applies_when.items():
            applies = applies & (pl.col(col) == value).fill_null(False)
        known = (matures_at <= as_of) & applies
        value = _label_value(decisions, events, label)
        exprs += [
            pl.when(known).then(pl.lit(value)).otherwise(None).cast(pl.Int8).alias(label.name),
            matures_at.alias(f"{label.name}_matures_at"),
            (matures_at <= as_of).alias(f"{label.name}_matured"),
        ]
    return decisions.with_columns(exprs).select(
        pl.exclude(spec.oracle_columns), *spec.oracle_columns
    )


def decision_summary(decisions: pl.DataFrame, spec: DatasetSpec) -> dict:
    """Row counts and, per label, how many rows are matured, labeled, and the positive rate."""
    summary: dict = {"decisions": decisions.height}
    for label in spec.labels:
        known = decisions[label.name].drop_nulls()
        summary[label.name] = {
            "matured": int(decisions[f"{label.name}_matured"].sum()),
            "labeled": known.len(),
            "positive_rate": float(known.mean()) if known.len() else None,
        }
    return summary
