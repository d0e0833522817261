"""Benchmark: how fast the synthetic lending world is generated, and what it looks like.

Generates a large world (default 200k users x 365 days, 10x the reference world) through the
streaming form `iter_days`, as ingestion does, and prints events, seconds, events/s and peak
RSS; then the reference world (20k users) in bulk with `simulate`, its time against the
one-minute budget, and its figures: volumes, approval and label rates, oracle AUCs.

    .venv/bin/python bench/simulate.py                        # 200k users x 365 days
    .venv/bin/python bench/simulate.py --users 50000 --days 180
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from datetime import UTC, datetime

import polars as pl
from sklearn.metrics import roc_auc_score

from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, date_of, iter_days, simulate

TASK = LENDING_PACK.promotion_rules.task  # the label promotion decides on

BUDGET_S = 60.0  # the reference world must generate in under a minute on a 2-core laptop


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def labelled(events: pl.DataFrame, config: WorldConfig, name: str) -> pl.DataFrame:
    """Matured applications with the spec's label: an outcome event in (ts, ts + horizon]."""
    label = LENDING_PACK.label(name)
    horizon = pl.duration(days=label.horizon_days)
    end = datetime.combine(date_of(config, config.n_days), datetime.min.time(), tzinfo=UTC)
    apps = events.filter(pl.col("event_type") == "application", pl.col("ts") + horizon <= end)
    for col, value in label.applies_when.items():
        apps = apps.filter(pl.col(col) == value)
    outcomes = events.filter(pl.col("event_type") == label.event_type).select(
        "entity_id", pl.col("ts").alias("t1")
    )
    hits = (
        apps.select("event_id", "entity_id", "ts")
        .join(outcomes, on="entity_id")
        .filter(pl.col("t1") > pl.col("ts"), pl.col("t1") <= pl.col("ts") + horizon)
        .select("event_id")
    )
    return apps.with_columns(
        pl.col("event_id").is_in(hits["event_id"].implode()).cast(pl.Int8).alias("y")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()

    large = WorldConfig(n_users=args.users, n_days=args.days)
    t = time.perf_counter()
    n_events = sum(frame.height for _, frame in iter_days(large))
    seconds = time.perf_counter() - t
    print(f"large world   {large.n_users:,} users x {large.n_days} days (streamed, iter_days)")
    print(f"  events      {n_events:,}")
    print(f"  seconds     {seconds:.1f}")
    print(f"  events/s    {n_events / seconds:,.0f}")
    print(f"  peak RSS    {peak_rss_mib():,.0f} MiB")

    reference = WorldConfig()
    t = time.perf_counter()
    events = simulate(reference)
    seconds = time.perf_counter() - t
    print(
        f"reference world   {reference.n_users:,} users x {reference.n_days} days (bulk, simulate)"
    )
    print(f"  events      {events.height:,}")
    print(
        f"  seconds     {seconds:.1f}   ({BUDGET_S / seconds:.0f}x under the {BUDGET_S:.0f} s budget)"
    )
    print(f"  events/s    {events.height / seconds:,.0f}")
    print(f"  peak RSS    {peak_rss_mib():,.0f} MiB (whole process so far)")

    apps = events.filter(pl.col("event_type") == "application")
    user_years = reference.n_users * reference.n_days / 365
    default = labelled(events, reference, TASK)
    fraud = labelled(events, reference, "fraud_60d")
    print("reference world figures")
    print(f"  events per user-year        {events.height / user_years:.0f}")
    print(f"  applications                {apps.height:,}")
    print(f"  approval rate               {(apps['policy_decision'] == 'approve').mean():.3f}")
    print(
        f"  {TASK} (approved, matured)  rate {default['y'].mean():.4f}   mean true_p {default['true_p_default'].mean():.4f}"
        f"   oracle AUC {roc_auc_score(default['y'], default['true_p_default']):.3f}   n={default.height:,}"
    )  # noqa: E501
    print(
        f"  fraud_60d (all, matured)         rate {fraud['y'].mean():.4f}   mean true_p {fraud['true_p_fraud'].mean():.4f}"
        f"   oracle AUC {roc_auc_score(fraud['y'], fraud['true_p_fraud']):.3f}   n={fraud.height:,}"
    )  # noqa: E501
    counts = events.group_by("event_type").len().sort("len", descending=True)
    print("  events by type  " + ", ".join(f"{t} {n:,}" for t, n in counts.iter_rows()))


if __name__ == "__main__":
    main()
