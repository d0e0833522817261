"""A small simulated world and private tables for Dagster runs in tests."""

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from resources.compute import Compute
from resources.delta import DeltaTables
from resources.sources import EventSource


@pytest.fixture
def tables(tmp_path) -> DeltaTables:
    return DeltaTables(root_uri=str(tmp_path / "tables"))


@pytest.fixture
def small_world() -> EventSource:
    return EventSource(n_users=400, fault_rate=0.01)


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def range_tags():
    """Tags that make one run cover a range of days (a single-run backfill)."""
    return lambda first, last: {
        ASSET_PARTITION_RANGE_START_TAG: first,
        ASSET_PARTITION_RANGE_END_TAG: last,
    }


@pytest.fixture
def resources_for():
    """The code location's resources, pointed at the given tables and event source."""
    return lambda tables, source: {
        "tables": tables,
        "io_manager": tables.io_manager(),
        "event_source": source,
        "compute": Compute(),
    }


# ---------------------------------------------------------------- one small world, trained once

TINY_ENCODER = {
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "max_len": 16,
    "emb_dim": 8,
    "epochs": 1,
}


def scorer_config(**overrides) -> dict:
    return {
        "n_estimators": 60,
        "learning_rate": 0.1,
        "max_depth": 3,
        "early_stopping_rounds": 20,
    } | overrides


@pytest.fixture
def scorer_settings():
    """Scorer run config for the small world: `scorer_settings(n_estimators=1, ...)`."""
    return scorer_config


class SmallWorld:
    """1,000 people over the simulated year, with private tables, models and MLflow store."""

    def __init__(self, root):
        from ml_assets.evaluation import champion, model_evaluation
        from ml_assets.features import decision_features, decisions, training_splits
        from ml_assets.ingest import ingest
        from ml_assets.models import (
            baseline_scorer,
            decision_embeddings,
            decision_scores,
            risk_scorer,
            sequence_encoder,
        )
        from resources.models import ModelIOManager
        from resources.tracking import MlflowTracking

        self.assets = [ingest, decision_features, decisions, training_splits, sequence_encoder,
                       decision_embeddings, baseline_scorer, risk_scorer, decision_scores,
                       model_evaluation, champion]  # fmt: skip
        self.tables = DeltaTables(root_uri=str(root / "tables"))
        self.mlflow = MlflowTracking.embedded(root / "mlflow")
        self.models = ModelIOManager(root=str(root / "models"))
        self.resources = {
            "tables": self.tables,
            "io_manager": self.tables.io_manager(),
            "model_io_manager": self.models,
            "mlflow_tracking": self.mlflow,
            "compute": Compute(),
            # Fraud raised (as the simulator's own tests do) so a three-week window still has some.
            "event_source": EventSource(
                n_users=1_000,
                fault_rate=0.0,
                world_options={"bust_out_rate": 0.03, "stolen_identity_rate": 0.02},
            ),
        }

    def run(self, instance, selection, *, scorer=None, tags=None):
        scorer = scorer or scorer_config()
        names = {s if isinstance(s, str) else s.to_user_string() for s in selection}
        ops = {
            "sequence_encoder": {"config": TINY_ENCODER},
            "baseline_scorer": {"config": scorer},
            "risk_scorer": {"config": scorer},
            # 1,000 people leave too few defaults to rank models by; fraud has the signal here.
            "champion": {"config": {"task": "fraud_60d", "max_ece": 0.1}},
        }
        return dg.materialize(
            self.assets,
            selection=selection,
            resources=self.resources,
            instance=instance,
            run_config={"ops": {k: v for k, v in ops.items() if k in names}},
            tags=tags or {},
        )

    def audit(self):
        return self.tables.scan("champion").collect().sort("decided_at")


@pytest.fixture(scope="session")
def small_world_trained(tmp_path_factory):
    """The year ingested and featurized in one run, then the training half with a deliberately
    modest first model (ten shallow trees), so later tests can fall short of it and beat it."""
    world = SmallWorld(tmp_path_factory.mktemp("small_world"))
    days = {
        ASSET_PARTITION_RANGE_START_TAG: "2025-01-01",
        ASSET_PARTITION_RANGE_END_TAG: "2025-12-31",
    }
    with dg.DagsterInstance.ephemeral() as instance:
        world.run(instance, ["raw_events", "event_rejects", "decision_features"], tags=days)
        unpartitioned = [key for a in world.assets[2:] for key in a.keys_by_output_name.values()]
        first = world.run(
            instance, unpartitioned, scorer=scorer_config(n_estimators=3, max_depth=1)
        )
        yield world, instance, first
