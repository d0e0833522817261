"""Shared state is created once: processes that start at the same instant on an empty state
folder, each the first to open a store, all succeed, and every row is there exactly once.
Against the embedded SQLite stores and against Postgres (EVENTML_POSTGRES_URL)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from first_use import features

from eventml.home import StateHome
from eventml.online_store import SQLiteOnlineStore
from eventml.worlds.lending import PACK as LENDING_PACK
from resources.state import create_databases, mlflow_tracking

WORKER = Path(__file__).with_name("first_use.py")
PROCESSES = 3


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path, monkeypatch) -> dict[str, str]:
    """The environment of an empty home, embedded or with Dagster and MLflow on Postgres (whose
    databases exist, as a platform provisions them, with no table in them yet)."""
    monkeypatch.setenv("EVENTML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    if request.param == "postgres":
        monkeypatch.setenv("EVENTML_POSTGRES_URL", request.getfixturevalue("postgres_url"))
        create_databases()
    return os.environ.copy()


def at_once(what: str, *args: str, env: dict | None = None) -> list[dict]:
    """Run the worker `what` in PROCESSES processes, released together once every one has
    imported what it needs; every one must exit 0."""
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), what, *args, str(i)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(PROCESSES)
    ]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-2000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [(p.communicate(timeout=180), p.returncode) for p in procs]
    failed = [err[-2000:] for (out, err), rc in outputs if rc != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} processes failed; the first:\n{failed[0]}"
    return [json.loads(out.strip().splitlines()[-1]) for (out, _), _ in outputs]


def test_training_assets_starting_together_on_an_empty_store_all_succeed(backend):
    results = at_once("tracking", env=backend)
    assert sorted(int(r["version"]) for r in results) == list(range(1, PROCESSES + 1))
    tracking = mlflow_tracking(StateHome.from_env())
    client = tracking.client()
    assert len(client.search_experiments()) == 2  # MLflow's Default and eventml's, once each
    runs = client.search_runs([tracking.experiment_id()])
    assert {r.info.run_id for r in runs} == {r["run_id"] for r in results}
    assert all(r.info.status == "FINISHED" and r.data.metrics["auc"] == 0.5 for r in runs)
    for i, result in enumerate(results):
        assert tracking.version_by_alias("first-use", f"of_{i}").version == int(result["version"])


def test_setting_up_an_empty_home_from_several_processes_at_once_succeeds(backend):
    prepared = at_once("prepare", env=backend)
    assert len({tuple(p["prepared"]) for p in prepared}) == 1
    home = Path(backend["EVENTML_HOME"])
    assert (home / "dagster" / "dagster.yaml").read_text().count("telemetry") == 1
    if "EVENTML_POSTGRES_URL" in backend:
        assert "postgres_url" in (home / "dagster" / "dagster.yaml").read_text()


def test_the_first_writes_of_a_new_table_leave_each_row_once(tmp_path):
    uri = str(tmp_path / "table")
    results = at_once("table", uri)
    table = pl.read_delta(uri)
    assert table.height == 500 and table["n"].n_unique() == 500 and table["who"].n_unique() == 1
    assert any(r["wrote"] for r in results)
    # A refused writer says why: another run committed the same rows first; it wrote nothing.
    assert all("committed first" in r["why"] for r in results if not r["wrote"])


def test_feature_kernels_compiled_by_processes_at_once_on_an_empty_cache_compute_right(tmp_path):
    """numba's cache of the feature kernels is shared by every process of a checkout: processes
    compiling them at once for different argument types (the lending and card worlds' feature
    families) must each get their own machine code, and the same features as this process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    results = at_once("features", env=env)
    for i, result in enumerate(results):
        assert result == features(str(i)), f"process {i} computed other features"


def test_the_first_writes_to_a_new_online_store_all_land(tmp_path):
    path = str(tmp_path / "online" / "store.sqlite")
    results = at_once("online_store", path)
    assert [r["written"] for r in results] == [50] * PROCESSES
    assert SQLiteOnlineStore(path, LENDING_PACK).stats()["entities"] == 50 * PROCESSES
