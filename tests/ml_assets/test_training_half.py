"""The training half, run for real on a small world: encoder → embeddings → scorers →
out-of-time evaluation → promotion, with MLflow (SQLite) as the registry."""

import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from eventml.promotion import champion_on
from eventml.risk_model import RiskModel, model_table
from ml_assets.evaluation import champion, model_evaluation
from ml_assets.features import decision_features, decisions, training_splits
from ml_assets.ingest import ingest
from ml_assets.models import REGISTERED_MODEL, baseline_scorer, decision_embeddings, risk_scorer, sequence_encoder
from resources.delta import DeltaTables
from resources.models import ModelIOManager
from resources.sources import EventSource
from resources.tracking import MlflowTracking

ALL = [ingest, decision_features, decisions, training_splits, sequence_encoder, decision_embeddings,
       baseline_scorer, risk_scorer, model_evaluation, champion]  # fmt: skip
TINY_ENCODER = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 16, "emb_dim": 8, "epochs": 1}


def scorer_config(**overrides) -> dict:
    return {"n_estimators": 60, "learning_rate": 0.1, "max_depth": 3, "early_stopping_rounds": 20} | overrides


class Trained:
    def __init__(self, root: Path):
        self.tables = DeltaTables(root_uri=str(root / "tables"))
        self.mlflow = MlflowTracking.embedded(root / "mlflow")
        self.models = ModelIOManager(root=str(root / "models"))
        self.resources = {
            "tables": self.tables,
            "io_manager": self.tables.io_manager(),
            "model_io_manager": self.models,
            "mlflow_tracking": self.mlflow,
            "event_source": EventSource(n_users=1_000, fault_rate=0.0),
        }

    def run(self, instance, selection, *, scorer=None, tags=None):
        scorer = scorer or scorer_config()
        config = {
            "ops": {
                "sequence_encoder": {"config": TINY_ENCODER},
                "baseline_scorer": {"config": scorer},
                "risk_scorer": {"config": scorer},
                "champion": {"config": {"max_ece": 0.1}},
            }
        }
        config["ops"] = {k: v for k, v in config["ops"].items() if k in selection}
        return dg.materialize(ALL, selection=selection, resources=self.resources, instance=instance,
                              run_config=config, tags=tags or {})  # fmt: skip

    def audit(self) -> pl.DataFrame:
        return self.tables.scan("champion").collect().sort("decided_at")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    trained = Trained(tmp_path_factory.mktemp("half"))
    with dg.instance_for_test() as instance:
        days = {ASSET_PARTITION_RANGE_START_TAG: "2025-01-01", ASSET_PARTITION_RANGE_END_TAG: "2025-12-31"}
        trained.run(instance, ["raw_events", "event_rejects", "decision_features"], tags=days)
        # A first, deliberately weak champion: few shallow trees.
        first = trained.run(instance, [key for a in ALL[2:] for key in a.keys_by_output_name.values()],
                            scorer=scorer_config(n_estimators=3, max_depth=1))  # fmt: skip
        yield trained, instance, first


def test_the_first_challenger_becomes_champion_and_everything_is_logged(world):
    trained, _, first = world
    assert first.success
    evaluation = trained.tables.scan("model_evaluation").collect()
    assert {"challenger", "baseline", "encoder_only", "oracle"} <= set(evaluation["model"])
    assert set(evaluation["task"]) == {"default_90d", "fraud_60d"}
    oracle = evaluation.filter(pl.col("model") == "oracle")
    assert (oracle["auc"] > 0.7).all()
    assert trained.audit()["action"].to_list() == ["promoted"]
    champion_version = trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion")
    run = trained.mlflow.client().get_run(champion_version.run_id)
    assert run.data.tags["dagster_run_id"] == first.run_id
    assert run.data.tags["delta_version.raw_events"] == "0"
    assert run.data.tags["git_commit"]


def test_a_worse_challenger_is_refused_and_the_alias_stays(world):
    trained, instance, _ = world
    before = trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion").version
    trained.run(instance, ["risk_scorer", "model_evaluation", "champion"], scorer=scorer_config(n_estimators=1, max_depth=1, learning_rate=0.01))
    assert trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion").version == before
    last = trained.audit().row(-1, named=True)
    assert last["action"] == "refused" and "does not reach the champion" in last["reasons"]
    evaluation = trained.tables.scan("model_evaluation").collect()
    assert "champion" in set(evaluation["model"])  # the incumbent was scored on the same rows


def test_a_better_challenger_is_promoted_and_the_audit_answers_who_served_when(world):
    trained, instance, _ = world
    trained.run(instance, ["risk_scorer", "model_evaluation", "champion"])
    audit = trained.audit()
    assert audit["action"].to_list()[-1] == "promoted"
    new = trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion").version
    assert str(new) == audit["challenger_version"][-1]
    assert champion_on(audit, audit["decided_at"][0]) == audit["champion_after"][0]
    assert champion_on(audit, audit["decided_at"][-1]) == str(new)


def test_a_model_reloaded_from_the_registry_predicts_exactly_what_was_trained(world):
    trained, _, _ = world
    version = trained.mlflow.version_by_alias(REGISTERED_MODEL, "challenger").version
    trained_model = RiskModel.load(trained.models.current_path(dg.AssetKey("risk_scorer")))
    with tempfile.TemporaryDirectory() as tmp:
        reloaded = RiskModel.load(trained.mlflow.download(REGISTERED_MODEL, str(version), Path(tmp)))
    table = model_table(
        trained.tables.scan("training_splits").collect().filter(pl.col("split") == "test"),
        trained.tables.scan("decision_features").collect(),
        trained.tables.scan("decision_embeddings").collect(),
    )
    for task, p in trained_model.scorer.predict(table).items():
        assert np.array_equal(reloaded.scorer.predict(table)[task], p)
