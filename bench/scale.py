"""Benchmark: the heavy steps on the 10x world, in one process and on a local Ray cluster, side by
side: wall time and peak memory per process for features -> encoder -> scorers -> embeddings.

Each step runs in a fresh child process per backend, on the same inputs (the in-process run
writes what the next step reads), so one step's memory never counts against another's. Peak
memory is private memory (`PeakRSS`): the step's own process and, on Ray, the largest of the
cluster's worker processes; the cluster is started before the clock starts. The events are a
Delta table partitioned by day, as `raw_events` is.

    .venv/bin/python bench/scale.py                     # 200,000 people, ~23.5M events
    .venv/bin/python bench/scale.py --users 20000       # the demo's size, to try it out
    .venv/bin/python bench/scale.py --shards 16         # features in 16 entity shards on Ray
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from features import world_events  # noqa: E402  (bench/features.py: the cached world)

from eventml.embedding import SequenceModel, SequenceModelConfig  # noqa: E402
from eventml.features.sharded import (  # noqa: E402
    entity_shards,
    shard_features,
    staged_shard_features,
)
from eventml.home import StateHome  # noqa: E402
from eventml.labels import build_decisions  # noqa: E402
from eventml.splits import split_decisions, with_person_folds  # noqa: E402
from eventml.worlds.lending import PACK, WorldConfig  # noqa: E402
from resources.delta import StagedDays, commit_days  # noqa: E402

STEPS = ("features", "encoder", "scorers", "embeddings")
BACKENDS = ("in_process", "ray")


def work_dir(users: int) -> Path:
    return StateHome.from_env().root / "bench" / f"scale_u{users}"


# ------------------------------------------------------------------ one step, in its own process


class PeakRSS:
    """The largest private memory (RSS less shared pages) this process, and any Ray worker
    process, reached while this object watched, sampled every 0.2 s. Shared pages are the Ray
    object store's, which every process that reads or writes an object maps: counted once, in
    the store, as Ray's memory monitor does. (`getrusage` would count what the parent held when
    it forked.)"""

    def __init__(self) -> None:
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            self.driver = max(self.driver, _private(me.memory_info()))
            for process in psutil.process_iter(["name", "memory_info"]):
                if (process.info["name"] or "").startswith("ray::") and process.info["memory_info"]:
                    self.workers = max(self.workers, _private(process.info["memory_info"]))

    def stop(self) -> tuple[float, float]:
        """Peak private memory of this process and of the largest worker, in GB."""
        self._stop.set()
        self._thread.join()
        return self.driver / 1024**3, self.workers / 1024**3


def _private(memory) -> int:
    return memory.rss - memory.shared


def run_step(step: str, backend: str, args) -> dict:
    from resources.compute import Compute

    directory = work_dir(args.users)
    directory.mkdir(parents=True, exist_ok=True)
    compute = Compute(backend=backend, shards=args.shards or None)
    if backend == "ray":
        compute.describe()  # starts the local cluster before the clock
    peak = PeakRSS()
    started = time.perf_counter()
    detail = STEP[step](directory, compute, args)
    seconds = time.perf_counter() - started
    driver, workers = peak.stop()
    return {
        "step": step,
        "backend": backend,
        "seconds": round(seconds, 1),
        "driver_peak_gb": round(driver, 2),
        "worker_peak_gb": round(workers, 2) if backend == "ray" else None,
        **detail,
    }


def prepare(directory: Path, args) -> None:
    """The inputs every step reads, written once: the world's events as a Delta table with a
    `day` column, and its decisions with their splits."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "splits.parquet").exists():
        splits = pl.read_parquet(directory / "splits.parquet")
        if "fold" not in splits.columns:  # prepared before cross-fitting
            with_person_folds(splits).write_parquet(directory / "splits.parquet")
        return
    events = world_events(WorldConfig(n_users=args.users))
    events.with_columns(pl.col("ts").dt.date().alias("day")).write_delta(
        str(directory / "raw_events"), delta_write_options={"partition_by": ["day"]}
    )
    splits = with_person_folds(split_decisions(build_decisions(events, PACK), PACK))
    splits.write_parquet(directory / "splits.parquet")


def features_step(directory: Path, compute, args) -> dict:
    uri = str(directory / "raw_events")
    # The decision events' own columns, as the asset's driver holds them (not their labels).
    columns = ["decision_id", *(c for c in PACK.event_schema() if c != "event_id")]
    decisions = pl.read_parquet(directory / "splits.parquet", columns=columns)
    end = decisions["ts"].max().date() + timedelta(days=1)
    history = pl.scan_delta(uri).drop("day")
    activity = PACK.activity_for(history, decisions)
    calls = [(uri, 0, end, part, PACK.feature_set().to_json(), activity)
             for part in entity_shards(decisions, compute.parts())]  # fmt: skip
    if compute.backend == "in_process":
        done = compute.map(shard_features, calls)
        pl.concat([part for part, _ in done]).write_parquet(directory / "features.parquet")
        hows = [how for _, how in done]
    else:  # as `decision_features` does on a cluster: each shard writes its rows, one commit
        table = directory / "decision_features_ray"
        shutil.rmtree(table, ignore_errors=True)
        done = compute.map(staged_shard_features, [(str(table), *call) for call in calls])
        staged = StagedDays(str(table), [f for files, *_ in done for f in files], done[0][1])
        start = decisions["ts"].min().date()
        commit_days(str(table), staged, "day", start, end, table="decision_features")
        hows = [how for _, _, how, _ in done]
    seconds = sorted(how["seconds"] for how in hows)
    return {"events": history.select(pl.len()).collect().item(), "decisions": decisions.height,
            "shards": len(calls), "shard_s_median": seconds[len(seconds) // 2],
            "shard_s_max": seconds[-1]}  # fmt: skip


def encoder_step(directory: Path, compute, args) -> dict:
    from eventml.embedding import train_sequence_model
    from eventml.encoder_data import EventTable

    # As the asset does: the table, which this process (in process) or each part's task (on
    # Ray) reads its entities' events from.
    events = EventTable(str(directory / "raw_events"), 0)
    splits = pl.read_parquet(directory / "splits.parquet")
    config = SequenceModelConfig(epochs=args.epochs)
    model, results = train_sequence_model(
        events, splits, PACK, config, log=lambda line: None, trainer=compute.encoder_trainer()
    )
    if compute.backend == "in_process":
        model.save(directory / "sequence_model")
    last = [result.history[-1] for result in results]  # one encoder per fold
    return {"sequences_per_s": "/".join(str(round(row["sequences_per_s"])) for row in last),
            "valid_mean_auc": "/".join(f"{row.get('valid_mean_auc', float('nan')):.4f}"
                                       for row in last)}  # fmt: skip


def scorers_step(directory: Path, compute, args) -> dict:
    from sklearn.metrics import roc_auc_score

    from eventml.risk_model import model_table
    from eventml.scorer import Scorer, ScorerConfig

    splits = pl.scan_parquet(directory / "splits.parquet")
    features = pl.scan_parquet(directory / "features.parquet")
    names, tasks = PACK.feature_set().names, [label.name for label in PACK.labels]
    rows = pl.col("split") == "train"
    valid = pl.col("split") == "valid"
    table = model_table(splits.filter(rows | valid).collect(), features)  # as the assets read it
    train_rows = table.filter(rows).height
    scorer = Scorer.fit(table.filter(rows), table.filter(valid), names, tasks,
                        ScorerConfig(monotone=PACK.monotone), log=lambda line: None,
                        booster_trainer=compute.booster_trainer())  # fmt: skip
    del table
    # The test window's AUC, read and scored a slice at a time: the fit's memory is the step's.
    test = splits.filter(pl.col("split") == "test", pl.col(tasks[0]).is_not_null()).collect()
    labels, scores = [], []
    for part in test.iter_slices(100_000):
        part = model_table(part, features)
        labels.append(part[tasks[0]].to_numpy())
        scores.append(scorer.predict(part)[tasks[0]])
    auc = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    return {f"test_auc_{tasks[0]}": round(auc, 4), "train_rows": train_rows}


def embeddings_step(directory: Path, compute, args) -> dict:
    model = SequenceModel.load(directory / "sequence_model")
    decisions = pl.read_parquet(directory / "splits.parquet")
    started = time.perf_counter()
    table = compute.embeddings(model, str(directory / "raw_events"), 0, decisions)
    return {"decisions": table.height,
            "decisions_per_s": round(table.height / (time.perf_counter() - started))}  # fmt: skip


STEP = {
    "features": features_step,
    "encoder": encoder_step,
    "scorers": scorers_step,
    "embeddings": embeddings_step,
}


# ------------------------------------------------------------------ the side-by-side run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000, help="simulated people (~118 events each)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=1, help="encoder epochs (each is timed)")
    parser.add_argument("--shards", type=int, default=16, help="entity shards on Ray (0: one per CPU)")  # fmt: skip
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    parser.add_argument("--one", nargs=2, metavar=("STEP", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # a child: one step on one backend, its figures as the last line
        print(json.dumps(run_step(*args.one, args)))
        return

    if args.prepare:  # a child, so the simulator's memory is not this process's to fork
        prepare(work_dir(args.users), args)
        return
    common = [
        "--users",
        str(args.users),
        "--epochs",
        str(args.epochs),
        "--shards",
        str(args.shards),
    ]
    subprocess.run([sys.executable, __file__, "--prepare", *common], check=True)
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    rows = []
    for step in args.steps.split(","):
        for backend in args.backends.split(","):
            command = [sys.executable, __file__, "--one", step, backend, *common]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:  # kept in the table: a step that cannot run at this size is a figure too
                why = "killed (out of memory?)" if done.returncode < 0 else done.stderr[-2000:]
                row = {"step": step, "backend": backend, "failed": why}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    columns = ["step", "backend", "seconds", "driver_peak_gb", "worker_peak_gb"]
    print(pl.DataFrame(rows).select(c for c in columns if any(c in row for row in rows)))
    print("target: peak memory per process < 2 GB at 23.5M events")


if __name__ == "__main__":
    main()
