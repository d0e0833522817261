"""`decision_features` on a Ray cluster (a local one of two CPUs, started once per session): the
decisions are split by entity, one shard per CPU, and each task reads its own entities' events
from the table, and writes its rows under the table for the run to commit. On the card world,
whose keyed features read every terminal's activity, the table is the in-process one to the
bit, and a run of some of the days replaces exactly those; a worker killed in the middle of its shard is replaced
by a new one and the features do not change; the run's metadata says where it ran."""

import os
import signal
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from eventml.features.sharded import entity_shards, shard_features
from eventml.worlds.calendar import date_of
from ml_assets.features import decision_features
from ml_assets.ingest import ingest, references
from resources.compute import Compute
from resources.delta import DeltaTables
from resources.sources import EventSource

CARDS = EventSource(pack="cards", n_users=300, n_days=30, fault_rate=0.0)
ON_RAY = Compute(backend="ray")


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster):
    """30 days of the card world ingested; `features(compute)` materializes decision_features
    over them and returns the table."""
    tables = DeltaTables(root_uri=str(tmp_path_factory.mktemp("cards") / "tables"))
    resources = {"tables": tables, "io_manager": tables.io_manager(), "event_source": CARDS,
                 "compute": Compute()}  # fmt: skip
    days = {
        ASSET_PARTITION_RANGE_START_TAG: date_of(CARDS.world(), 0).isoformat(),
        ASSET_PARTITION_RANGE_END_TAG: date_of(CARDS.world(), CARDS.n_days - 1).isoformat(),
    }
    assets = [references, ingest, decision_features]
    with dg.DagsterInstance.ephemeral() as instance:
        for selection in (["references"], ["raw_events", "event_rejects"]):
            assert dg.materialize(assets, selection=selection, resources=resources,
                                  instance=instance, tags=days).success  # fmt: skip

        def features(compute: Compute, tags: dict = days) -> tuple[pl.DataFrame, dict]:
            result = dg.materialize(assets, selection=["decision_features"], instance=instance,
                                    resources={**resources, "compute": compute}, tags=tags)  # fmt: skip
            assert result.success
            meta = result.asset_materializations_for_node("decision_features")[-1].metadata
            table = tables.scan("decision_features").collect().sort("decision_id")
            return table, meta["compute"].value

        yield tables, features


def test_features_computed_by_shard_on_ray_are_the_in_process_features(world):
    _, features = world
    in_process, where = features(Compute())
    on_ray, where_ray = features(ON_RAY)
    assert in_process.height > 1_000 and on_ray.equals(in_process)
    assert where["compute"] == "in_process" and len(where["shards"]) == 1
    assert where_ray["compute"] == "ray" and where_ray["ray_cpus"] == 2
    shards = where_ray["shards"]
    assert len(shards) == 2 and sum(s["decisions"] for s in shards) == in_process.height
    assert all(s["pid"] != os.getpid() for s in shards)  # computed by the cluster's workers


def test_a_run_of_some_days_on_ray_replaces_exactly_those_days(world):
    """On Ray the workers write their rows under the table themselves and the run commits them:
    the days it ran are replaced, once, and the others kept."""
    tables, features = world
    whole, _ = features(Compute())
    days = {ASSET_PARTITION_RANGE_START_TAG: date_of(CARDS.world(), 10).isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: date_of(CARDS.world(), 19).isoformat()}  # fmt: skip
    before = tables.version("decision_features")
    again, _ = features(ON_RAY, days)
    assert again.equals(whole) and tables.version("decision_features") == before + 1


def test_a_worker_killed_in_the_middle_of_its_shard_is_replaced_and_nothing_changes(
    world, tmp_path
):
    tables, _ = world
    uri, version = tables.uri("raw_events"), tables.version("raw_events")
    spec, history = CARDS.spec(), tables.scan("raw_events").drop("day")
    decisions = (
        history.filter(pl.col("event_type").is_in(spec.decision_event_types))
        .rename({"event_id": "decision_id"})
        .collect()
    )
    end = date_of(CARDS.world(), CARDS.n_days)
    feature_set, activity = spec.feature_set(), spec.activity_for(history, decisions)
    calls = [(uri, version, end, part, feature_set.to_json(), activity)
             for part in entity_shards(decisions, 2)]  # fmt: skip
    killed = Path(tmp_path) / "killed"

    def dies_once(*args):  # a closure: pickled by value, so the workers need not import tests/
        if not killed.exists():
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return shard_features(*args)

    expected = Compute().map(shard_features, calls)
    again = ON_RAY.map(dies_once, calls)
    assert killed.exists()
    for (want, _), (got, how) in zip(expected, again):
        assert got.equals(want) and how["pid"] != os.getpid()
