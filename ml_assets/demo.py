"""`make demo`: ingest the default simulated world through Dagster, then summarize the tables.

The run goes through the `dagster` CLI against DAGSTER_HOME, so it is an ordinary run that the
UI (`make ui`) shows afterwards, with its metadata and checks.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from eventml.home import StateHome
from eventml.simulate import WorldConfig
from ml_assets.definitions import build_resources
from ml_assets.partitions import daily

# The demo's "today": the eve of the simulated regime shift, so `make advance` has a future to
# move into (python -m ml_assets.demo --days N for another present).
DEFAULT_DAYS = WorldConfig.shift_day or WorldConfig.n_days


def materialize(selection: str, partitioned: bool, n_days: int = DEFAULT_DAYS) -> None:
    """One run over the first `n_days` days for daily assets (a single-run backfill), one run
    for the rest."""
    keys = daily.get_partition_keys()[:n_days]
    cmd = [
        str(Path(sys.executable).with_name("dagster")),  # the CLI of this same environment
        "asset", "materialize", "-m", "ml_assets.definitions", "--select", selection,
    ]  # fmt: skip
    if partitioned:
        cmd += ["--partition-range", f"{keys[0]}...{keys[-1]}"]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)


def summary() -> None:
    tables = build_resources()["tables"]
    events = tables.scan("raw_events").collect()
    rejects = tables.scan("event_rejects").collect()
    print("\n== eventml demo: ingest ==")
    print(
        f"raw_events    {events.height:>12,} rows  {events['day'].n_unique()} days  "
        f"{events['entity_id'].n_unique():,} entities  (Delta v{tables.version('raw_events')})"
    )
    print(f"event_rejects {rejects.height:>12,} rows  (Delta v{tables.version('event_rejects')})")
    with pl.Config(tbl_rows=20, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(events.group_by("event_type").len("rows").sort("rows", descending=True))
        print(rejects.group_by("reason").len("rows").sort("rows", descending=True))
    splits = tables.scan("training_splits").collect()
    print("\n== features ==")
    print(
        f"decision_features {tables.scan('decision_features').select(pl.len()).collect().item():,} decisions"
    )
    with pl.Config(
        tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=4
    ):
        print(
            splits.group_by("split")
            .agg(
                pl.len().alias("decisions"),
                pl.col("ts").min().dt.date().alias("from"),
                pl.col("ts").max().dt.date().alias("to"),
                pl.col("default_90d").mean().alias("default_90d_rate"),
                pl.col("fraud_60d").mean().alias("fraud_60d_rate"),
            )
            .sort("from")
        )
    evaluation = tables.scan("model_evaluation").collect()
    print("\n== out-of-time evaluation (test split) ==")
    with pl.Config(
        tbl_rows=20,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        float_precision=4,
    ):
        print(
            evaluation.select("task", "model", "n", "rate", "auc", "pr_auc", "brier", "ece").sort(
                "task", "model"
            )
        )
    audit = tables.scan("champion").collect().sort("decided_at")
    last = audit.row(-1, named=True)
    print(
        f"champion: v{last['champion_after']} ({last['action']} v{last['challenger_version']}: {last['reasons']})"
    )
    print(
        f"tables: {tables.root_uri}   UI: make ui   MLflow: make mlflow   serve the Bento: make serve"
    )
    print(f"today is {events['day'].max()}: `make advance DAYS=30` moves the world forward")


def main() -> int:
    ap = argparse.ArgumentParser(description="Ingest the simulated world and train on it.")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days to ingest from day 0")
    args = ap.parse_args()
    started = time.perf_counter()
    # Dagster refuses a DAGSTER_HOME that does not exist; `make demo` sets it under EVENTML_HOME.
    Path(os.environ.setdefault("DAGSTER_HOME", str(StateHome.from_env().dagster))).mkdir(
        parents=True, exist_ok=True
    )
    materialize(
        "raw_events,event_rejects,decision_features,online_store",
        partitioned=True,
        n_days=args.days,
    )
    materialize(
        "decisions,training_splits,sequence_encoder,decision_embeddings,baseline_scorer,risk_scorer,"
        "model_evaluation,champion,risk_service_bento",
        partitioned=False,
    )
    summary()
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
