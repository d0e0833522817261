"""`make demo`: ingest the default simulated world through Dagster, train on it, summarize.

    python -m ml_assets.demo [--days N] [--config RUN_CONFIG.yaml]

Two runs through the `dagster` CLI against DAGSTER_HOME (ordinary runs, with the multiprocess
executor, that the UI shows afterwards with their metadata and checks): the daily assets over
the first `--days` days in one run, then the training half. The terminal gets one line per
step with its time; everything the runs print goes to a log file under `$EVENTML_HOME/logs`,
whose path is printed first. A failed step is named with its error in one sentence and the log.

`--config` takes a Dagster run config for the whole graph (`resources:` and `ops:` keys, as
the UI's launchpad takes); each run gets every resource and the ops of its own assets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import yaml

from eventml.home import StateHome
from eventml.worlds import selected_pack, world
from ml_assets.jobs import RETRAIN
from ml_assets.partitions import daily
from resources.state import dagster_home, prepare

with warnings.catch_warnings():  # the terminal is for the demo's lines; the beta API is chosen
    warnings.simplefilter("ignore", dg.BetaWarning)
    from ml_assets.definitions import build_resources, defs

# The demo's "today": the eve of the simulated regime shift, so `make advance` has a future to
# move into (python -m ml_assets.demo --days N for another present).
DEMO = world(selected_pack())
DEFAULT_DAYS = DEMO.DEMO_DAYS
INGEST = ("raw_events", "event_rejects", "decision_features", "online_store")
TRAIN = RETRAIN  # what `retrain_job` refreshes, after the days are in


class StageFailed(Exception):
    pass


def run_config_for(selection: tuple[str, ...], config: dict) -> dict:
    """The part of a whole-graph run config that a run of `selection` accepts."""
    op_of = {k.to_user_string(): a.node_def.name
             for a in defs.resolve_asset_graph().assets_defs for k in a.keys}  # fmt: skip
    ops = {op_of[name] for name in selection}
    own = {k: v for k, v in (config.get("ops") or {}).items() if k in ops}
    return {**({"resources": config["resources"]} if config.get("resources") else {}),
            **({"execution": config["execution"]} if config.get("execution") else {}),
            **({"ops": own} if own else {})}  # fmt: skip


def materialize_command(
    selection: tuple[str, ...], days: tuple[str, str] | None, config: dict
) -> list[str]:
    """The CLI call of one run: over the partition keys `days` (first, last) in a single run
    for daily assets, or unpartitioned when `days` is None."""
    cmd = [
        str(Path(sys.executable).with_name("dagster")),  # the CLI of this same environment
        "asset", "materialize", "-m", "ml_assets.definitions", "--select", ",".join(selection),
    ]  # fmt: skip
    if days is not None:
        cmd += ["--partition-range", f"{days[0]}...{days[1]}"]
    own = run_config_for(selection, config)
    if own:
        cmd += ["--config-json", json.dumps(own)]
    return cmd


def why_it_failed(run_id: str, step: str) -> str:
    """One sentence from the run's event log: the checks that failed the step, else its
    innermost error."""
    kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
    with dg.DagsterInstance.get() as instance:
        records = [r for r in instance.all_logs(run_id, of_type=kinds) if r.step_key == step]
    checks = [r.dagster_event.event_specific_data for r in records
              if r.dagster_event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]  # fmt: skip
    failed = [f"check {c.check_name} on {c.asset_key.to_user_string()} did not pass ({c.description})"
              for c in checks if not c.passed]  # fmt: skip
    if failed:
        return "; ".join(failed)
    for record in records:
        error = getattr(record.dagster_event.event_specific_data, "error", None)
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return " ".join(f"{error.cls_name}: {error.message}".split())[:300]
    return "no error was recorded (see the log)"


def _step_events(instance, run_id: str) -> list:
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
             dg.DagsterEventType.STEP_FAILURE}  # fmt: skip
    return instance.all_logs(run_id, of_type=kinds)


def materialize(title: str, cmd: list[str], log_path: Path) -> None:
    """Run one materialization with its output in the log, echoing a line per finished step
    from the run's event log (the CLI's own output loses lines of forked steps); raise
    StageFailed if it fails."""
    print(title, flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd[1:])}\n")
    launched = datetime.now(UTC)
    selection = cmd[cmd.index("--select") + 1].split(",")
    wanted = {dg.AssetKey(name) for name in selection}
    shown, run_id = set(), None
    with dg.DagsterInstance.get() as instance, open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            done = proc.poll() is not None
            if run_id is None:  # this CLI's run: the first since launch of exactly these assets
                found = [r.dagster_run for r in instance.get_run_records(
                    dg.RunsFilter(created_after=launched), ascending=True)
                    if r.dagster_run.asset_selection == wanted]  # fmt: skip
                run_id = found[0].run_id if found else None
            if run_id is not None:
                events = _step_events(instance, run_id)
                begun = {e.step_key: e.timestamp for e in events
                         if e.dagster_event.event_type == dg.DagsterEventType.STEP_START}  # fmt: skip
                for e in events:
                    if e.dagster_event.event_type == dg.DagsterEventType.STEP_START:
                        continue
                    if (e.step_key, e.dagster_event.event_type) not in shown:
                        shown.add((e.step_key, e.dagster_event.event_type))
                        seconds = e.timestamp - begun.get(e.step_key, e.timestamp)
                        ok = e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS
                        print(f"  {e.step_key:<28} {seconds:6.0f} s{'' if ok else '  FAILED'}",
                              flush=True)  # fmt: skip
            if done:
                break
            time.sleep(1)
    if proc.returncode == 0:
        return
    failed = [step for step, kind in shown if kind == dg.DagsterEventType.STEP_FAILURE]
    if not failed:  # the run itself did not start: the CLI's last words say why
        lines = [x for x in log_path.read_text().splitlines() if x.strip()]
        raise StageFailed(f"{title.rstrip(':')} failed: {(lines or ['no output'])[-1][:300]}")
    reasons = "; ".join(f"{step}: {why_it_failed(run_id, step)}" for step in failed)
    raise StageFailed(f"{title.rstrip(':')} failed in {reasons}")


def summary() -> None:
    resources = build_resources()
    tables, pack = resources["tables"], resources["event_source"].spec()
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
                *[pl.col(x.name).mean().alias(f"{x.name}_rate") for x in pack.labels],
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
    ap.add_argument("--config", type=Path, help="a Dagster run config (YAML) for the whole graph")
    args = ap.parse_args()
    # Without --config, the world's own demo settings (its size, its training).
    config = yaml.safe_load(args.config.read_text()) if args.config else DEMO.DEMO_CONFIG
    started = time.perf_counter()
    home = StateHome.from_env()
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home(home)))  # for the CLI's runs
    home.logs.mkdir(parents=True, exist_ok=True)
    log_path = home.logs / f"demo-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
    log_path.write_text("")
    try:  # every store created once, before the runs' steps open them at once
        lines = prepare(home)
    except Exception as error:
        log_path.write_text(traceback.format_exc())
        print(f"demo failed: setting up the state in {home.root}: {type(error).__name__}: "
              f"{error}\nfull log: {log_path}", file=sys.stderr)  # fmt: skip
        return 1
    print("\n".join(lines))
    print(f"full log: {log_path}", flush=True)
    try:
        keys = daily.get_partition_keys()[: args.days]
        if DEMO.PACK.references:  # unpartitioned, before the days that attach them
            materialize("reference tables:", materialize_command(("references",), None, config),
                        log_path)  # fmt: skip
        materialize(f"ingest and features, {keys[0]}..{keys[-1]}:",
                    materialize_command(INGEST, (keys[0], keys[-1]), config), log_path)  # fmt: skip
        materialize("training:", materialize_command(TRAIN, None, config), log_path)
    except StageFailed as failure:
        print(f"demo failed: {failure}\nfull log: {log_path}", file=sys.stderr)
        return 1
    summary()
    print(f"demo finished in {time.perf_counter() - started:.0f} s (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
