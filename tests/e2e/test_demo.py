"""`make demo` on an empty home, as a new user runs it, on a small world: the demo's own two
runs (the `dagster` CLI, the multiprocess executor, steps side by side) succeed with Dagster
and MLflow on Postgres (on the embedded SQLite where no server runs; the SQLite stores' races
are tests/resources/test_shared_state.py's), print a line per step, and log the rest.

Then runs SIGKILLed partway through writing `raw_events`, `decision_features`, `online_store`
and a training asset leave the previous version of each readable and the champion alias where
it was, and re-running converges to exactly one copy of every row.
"""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from eventml.embedding import SequenceModel
from eventml.home import StateHome
from eventml.online_store import SQLiteOnlineStore
from eventml.worlds.lending import PACK as LENDING_PACK
from ml_assets.demo import INGEST, TRAIN, materialize_command
from ml_assets.models import REGISTERED_MODEL
from resources.compute import CPU_POOL
from resources.delta import DeltaTables
from resources.state import mlflow_tracking

# 1,000 people over the year; fraud raised so every split holds some; a tiny encoder.
SMALL_WORLD = {
    "resources": {"event_source": {"config": {
        "n_users": 1_000, "fault_rate": 0.001,
        "world_options": {"bust_out_rate": 0.03, "stolen_identity_rate": 0.02},
    }}},
    "ops": {
        "sequence_encoder": {"config": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 16,
                                        "emb_dim": 8, "epochs": 2}},
        "baseline_scorer": {"config": {"n_estimators": 40, "max_depth": 3}},
        "risk_scorer": {"config": {"n_estimators": 40, "max_depth": 3}},
        # 1,000 people leave too few defaults to rank models by; fraud has the signal here.
        "champion": {"config": {"task": "fraud_60d", "max_ece": 0.1}},
    },
}  # fmt: skip
DAYS = 365
REPO = Path(__file__).resolve().parents[2]
STEPS = ("ingest", "online_store", "decision_features", *TRAIN)


class Home:
    """An empty state folder and the environment that points every process at it."""

    def __init__(self, root: Path, postgres_url: str | None = None):
        self.root = root
        self.env = {**os.environ, "EVENTML_HOME": str(root), "DAGSTER_HOME": str(root / "dagster")}
        for inherited in ("EVENTML_POSTGRES_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            self.env.pop(inherited, None)  # mlflow.set_tracking_uri exports its URI
        if postgres_url:
            self.env["EVENTML_POSTGRES_URL"] = postgres_url
        self.config = root.parent / f"{root.name}-world.yaml"
        self.config.write_text(yaml.safe_dump(SMALL_WORLD))

    def demo(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ml_assets.demo", "--days", str(DAYS), "--config", str(self.config)],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip

    @property
    def tables(self) -> DeltaTables:
        return DeltaTables(root_uri=str(self.root / "tables"))


def _demo(home: Home) -> tuple[Home, subprocess.CompletedProcess]:
    result = home.demo()
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return home, result


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    """The demo on an empty home with Dagster and MLflow on Postgres, the production
    counterpart, where a server answers (always in CI); elsewhere on the embedded stores."""
    try:
        url = request.getfixturevalue("new_postgres_url")()
    except pytest.skip.Exception:
        url = None
    return _demo(Home(tmp_path_factory.mktemp("demo") / "home", url))


def champion_version(home: Home) -> str:
    with pytest.MonkeyPatch.context() as env:  # the home's settings, in this process
        env.setenv("EVENTML_HOME", str(home.root))
        env.delenv("EVENTML_POSTGRES_URL", raising=False)
        if "EVENTML_POSTGRES_URL" in home.env:
            env.setenv("EVENTML_POSTGRES_URL", home.env["EVENTML_POSTGRES_URL"])
        found = mlflow_tracking(StateHome.from_env()).version_by_alias(REGISTERED_MODEL, "champion")
        return str(found.version) if found else None


def assert_the_demo_told_its_story(home: Home, result: subprocess.CompletedProcess) -> None:
    for step in STEPS:  # one line per step, with its time
        assert re.search(rf"^  {step} +\d+ s$", result.stdout, re.M), f"no line for {step}"
    assert "DEBUG" not in result.stdout and len(result.stdout.splitlines()) < 120
    log = Path(re.search(r"^full log: (\S+)$", result.stdout, re.M).group(1))
    assert log.parent == home.root / "logs" and "STEP_SUCCESS" in log.read_text()
    assert "champion: v1 (promoted v1" in result.stdout


def test_the_demo_succeeds_on_an_empty_home(demo):
    home, result = demo
    assert_the_demo_told_its_story(home, result)
    assert champion_version(home) == "1"
    bentos = list((home.root / "bentoml" / "bentos" / "eventml_risk").glob("*/bento.yaml"))
    assert len(bentos) == 1
    with dg.DagsterInstance.from_config(str(home.root / "dagster")) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        on_postgres = "EVENTML_POSTGRES_URL" in home.env
        storage = type(instance.run_storage).__name__
        assert storage == ("PostgresRunStorage" if on_postgres else "SqliteRunStorage")
    # On Postgres nothing fell back to SQLite.
    assert (home.root / "mlflow" / "mlflow.db").exists() != on_postgres


# ---------------------------------------------------------------- killed partway, then re-run

KILL_DAYS = ("2025-10-01", "2025-11-29")  # 60 days re-written by the killed runs


def kill_when(home: Home, cmd: list[str], moment, what: str) -> None:
    """Start a run in its own process group; SIGKILL the whole group once `moment()` is true.
    The run is niced: with the cores busy (the other test worker), this process must still look
    often enough to catch the moment before the run's next step (a commit) passes it."""
    with open(home.root / "logs" / "killed-run.log", "a") as log:
        proc = subprocess.Popen(["nice", "-n", "19", *cmd], cwd=REPO, env=home.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not moment():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within 600 s"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def new_files(folder: Path, pattern: str):
    """A moment: a file matching `pattern` under `folder` that was not there when asked."""
    before = set(folder.rglob(pattern))
    return lambda: any(path not in before for path in folder.rglob(pattern))


def new_data_file(table: Path, days: tuple[str, str]):
    """A moment: a new data file in one of the day partitions [first, last] of a table. Only
    those folders are looked in: walking the whole table (a folder per day of the year) between
    two looks left a write of them time to finish and commit unseen."""
    first, last = (date.fromisoformat(d) for d in days)
    folders = [table / f"day={first + timedelta(n)}" for n in range((last - first).days + 1)]

    def files() -> set[str]:
        return {
            e.path
            for f in folders
            if f.is_dir()
            for e in os.scandir(f)
            if e.name.endswith(".parquet")
        }

    before = files()
    return lambda: bool(files() - before)


def write_locked(path: Path):
    """A moment: another connection holds the SQLite store's write lock (a write transaction)."""

    def moment() -> bool:
        db = sqlite3.connect(path, timeout=0)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            db.close()

    return moment


def snapshot(home: Home) -> dict:
    tables = home.tables
    store = SQLiteOnlineStore(home.root / "online" / "store.sqlite", LENDING_PACK)
    entities = (
        tables.scan("raw_events").select("entity_id").unique().collect()["entity_id"].to_list()
    )
    return {
        "raw_events": tables.scan("raw_events").collect().sort("event_id"),
        "decision_features": tables.scan("decision_features").collect().sort("decision_id"),
        "online": store.histories(sorted(entities)).sort("entity_id", "ts", "event_id"),
    }


@pytest.fixture(scope="module")
def before_kills(demo):
    home, _ = demo
    return snapshot(home)


# The runs below are the demo's CLI calls with every step in the run's own process: killing the
# process group kills the writer either way, and a step server's start costs seconds per run.
IN_PROCESS = {"execution": {"config": {"in_process": True}}}


def ingest_run(home: Home, selection=INGEST, config=SMALL_WORLD) -> list[str]:
    return materialize_command(selection, KILL_DAYS, {**config, **IN_PROCESS})


# The killed runs ingest another world: had any of their rows become visible, it would show.
# (Its days may hold fewer rows, which ingest refuses unless told: the kill must find a write.)
ANOTHER_WORLD = {"resources": {"event_source": {"config": {
    **SMALL_WORLD["resources"]["event_source"]["config"], "seed": 7}}},
    "ops": {"ingest": {"config": {"allow_shrinking_days": True}}}}  # fmt: skip


@pytest.mark.parametrize(
    "table, selection",
    [("raw_events", INGEST), ("decision_features", ("decision_features",))],
)
def test_a_run_killed_while_writing_a_table_leaves_its_previous_version(
    demo, before_kills, table, selection
):
    home, _ = demo
    version = home.tables.version(table)
    kill_when(home, ingest_run(home, selection, ANOTHER_WORLD),
              new_data_file(Path(home.tables.uri(table)), KILL_DAYS),
              f"a new data file of {table}")  # fmt: skip
    # Killed after its first data file and before its commit: nothing of it is visible.
    assert home.tables.version(table) == version
    key = "event_id" if table == "raw_events" else "decision_id"
    assert home.tables.scan(table).collect().sort(key).equals(before_kills[table])


def test_a_run_killed_while_writing_the_online_store_leaves_it_as_it_was(demo, before_kills):
    home, _ = demo
    path = home.root / "online" / "store.sqlite"
    kill_when(home, ingest_run(home, ("online_store",), ANOTHER_WORLD), write_locked(path),
              "a write transaction on the online store")  # fmt: skip
    assert snapshot(home)["online"].equals(before_kills["online"])


def test_the_set_up_step_marks_the_killed_runs_failed(demo, before_kills):
    home, _ = demo
    with dg.DagsterInstance.from_config(str(home.root / "dagster")) as instance:
        started = {
            r.run_id
            for r in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        }
        holders = claimed_slots(instance)
    assert len(started) >= 3  # the three kills above, left "in progress" by their dead process
    assert holders and holders <= started  # the killed features step's slot in the CPU pool
    done = subprocess.run([sys.executable, "-m", "resources.state"], cwd=REPO, env=home.env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {
        line.split()[3].rstrip(",")
        for line in done.stdout.splitlines()
        if line.startswith("marked failed")
    } == started
    with dg.DagsterInstance.from_config(str(home.root / "dagster")) as instance:
        for run_id in started:
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert not claimed_slots(instance)  # the next heavy step does not wait for a dead one


def claimed_slots(instance: dg.DagsterInstance) -> set[str]:
    """The runs holding a slot of the CPU-heavy steps' pool."""
    return {
        slot.run_id
        for slot in instance.event_log_storage.get_concurrency_info(CPU_POOL).claimed_slots
    }


def test_re_running_after_the_kills_converges_to_one_copy_of_every_row(demo, before_kills):
    home, _ = demo
    done = subprocess.run(ingest_run(home), cwd=REPO, env=home.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    after = snapshot(home)
    for name, frame in before_kills.items():
        assert after[name].equals(frame), name
    assert after["raw_events"]["event_id"].is_unique().all()
    assert after["decision_features"]["decision_id"].is_unique().all()


def test_a_retrain_killed_while_saving_the_encoder_leaves_the_champion_and_a_whole_model(demo):
    home, _ = demo
    champion = champion_version(home)
    models = home.root / "models" / "sequence_encoder"
    encoder_run = materialize_command(("sequence_encoder",), None, {**SMALL_WORLD, **IN_PROCESS})
    kill_when(home, encoder_run, new_files(models, "*"), "a new encoder folder")
    assert champion_version(home) == champion
    # The pointer names a whole model, the old one or (if the kill came after the save) the new.
    SequenceModel.load(models / (models / "current").read_text().strip())
    # Re-running the killed step converges: a whole new model, and the pointer names it. First
    # the set-up step every entry point runs: it frees the pool slot the killed step held.
    subprocess.run([sys.executable, "-m", "resources.state"], cwd=REPO, env=home.env, check=True)
    pointer = (models / "current").read_text()
    again = subprocess.run(encoder_run, cwd=REPO, env=home.env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (models / "current").read_text() != pointer
    SequenceModel.load(models / (models / "current").read_text().strip())
    assert champion_version(home) == champion
