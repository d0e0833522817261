"""One process's first use of a store, run by test_shared_state.py in several processes at
once: `python first_use.py WHAT [ARG] WHO`. Each imports everything, prints "ready", and starts
when a line arrives on stdin, so the first opens coincide; then it prints one JSON line of what
it did. The state folder and backends come from the environment (EVENTML_HOME,
EVENTML_POSTGRES_URL)."""

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import polars as pl

from eventml.home import StateHome
from eventml.online_store import SQLiteOnlineStore
from eventml.worlds.lending import PACK as LENDING_PACK
from resources.delta import ConcurrentWriteError, write_days
from resources.state import mlflow_tracking, prepare


def training_asset_start(who: str) -> dict:
    """What a training asset does first: open tracking, start a run, log, register, alias."""
    tracking = mlflow_tracking(StateHome.from_env())
    with tracking.start_run(f"first_use_{who}", {"who": who}) as run:
        mlflow.log_metric("auc", 0.5)
        folder = Path(tempfile.mkdtemp())
        (folder / "model.json").write_text(json.dumps({"who": who}))
        mlflow.log_artifacts(str(folder), "model")
    version = tracking.register("first-use", run.info.run_id, "model", alias=f"of_{who}")
    return {"run_id": run.info.run_id, "version": version}


def table_write(uri: str, who: str) -> dict:
    """The same day of a table that does not exist yet, written by every process."""
    day = datetime(2025, 1, 1, tzinfo=UTC)
    frame = pl.DataFrame({"day": [day.date()] * 500, "n": range(500), "who": [who] * 500})
    try:
        write_days(uri, frame, "day", day, datetime(2025, 1, 2, tzinfo=UTC), table="t")
        return {"wrote": True}
    except ConcurrentWriteError as refused:
        return {"wrote": False, "why": str(refused)}


def online_store_write(path: str, who: str) -> dict:
    store = SQLiteOnlineStore(path, LENDING_PACK)
    schema, n = LENDING_PACK.event_schema(), 50
    events = pl.DataFrame({c: [None] * n for c in schema}, schema=schema).with_columns(
        pl.Series("entity_id", [f"{who}-{i}" for i in range(n)]),
        pl.Series("event_id", [f"{who}-e{i}" for i in range(n)]),
        pl.lit(datetime(2025, 1, 1, tzinfo=UTC)).alias("ts"),
        pl.lit("session").alias("event_type"),
    )
    return {"written": store.write(events)}


def features(who: str) -> dict:
    """Point-in-time features of a small world, the lending one or (odd `who`) the card one,
    whose feature families compile the kernels for other argument types: a digest of them."""
    from eventml.worlds import world
    from resources.sources import EventSource

    source = EventSource(pack="cards" if int(who) % 2 else "lending", n_users=150, n_days=40)
    spec, events = source.spec(), world(source.pack).simulate(source.world())
    decisions = events.filter(pl.col("event_type").is_in(spec.decision_event_types))
    decisions = decisions.rename({"event_id": "decision_id"})
    table = spec.compute_features(events, decisions)
    return {"pack": spec.name, "digest": str(table.sort("decision_id").hash_rows().sum())}


def prepare_home(_who: str) -> dict:
    return {"prepared": prepare()}


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    print("ready", flush=True)
    sys.stdin.readline()
    action = {"tracking": training_asset_start, "table": table_write,
              "online_store": online_store_write, "prepare": prepare_home,
              "features": features}[what]  # fmt: skip
    print(json.dumps(action(*args)))
