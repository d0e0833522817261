"""The code location loads, as Dagster itself would load it."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ml_assets.definitions import defs
from resources.compute import CPU_POOL

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_are_loadable():
    dg.Definitions.validate_loadable(defs)


def test_the_lineage_starts_with_ingest():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_events", "event_rejects"} <= keys
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == dg.AssetKey("raw_events")}
    assert checks == {
        "schema",
        "required_fields_not_null",
        "unique_event_ids",
        "daily_volume",
        "reject_rate",
        "no_day_shrinks",
    }


def test_dagster_cli_validates_the_workspace():
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_steps_that_keep_every_core_busy_share_one_pool():
    graph = defs.resolve_asset_graph()
    heavy = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).pools}
    assert heavy == {"decision_features", "sequence_encoder", "decision_embeddings",
                     "baseline_scorer", "risk_scorer", "decision_scores"}  # fmt: skip
    assert all(graph.get(dg.AssetKey(name)).pools == {CPU_POOL} for name in heavy)
