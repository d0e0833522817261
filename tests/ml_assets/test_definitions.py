"""The code location loads, as Dagster itself would load it."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ml_assets.definitions import defs

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
