"""One small simulated world, a tiny risk model trained on it and registered as the
MLflow champion, its Bento built by `risk_service_bento` (parity check included), and the Bento
served in a subprocess for the tests in this folder.

About a minute on 2 quiet cores: 500 users, a 16-wide one-layer encoder for one epoch, 30 trees.
"""

import os
import tempfile
import time

import dagster as dg
import polars as pl
import pytest

from eventml.embedding import SequenceModelConfig, embedding_table, train_sequence_model
from eventml.labels import build_decisions
from eventml.risk_model import DecisionPolicy, RiskModel, model_table
from eventml.scorer import Scorer, ScorerConfig
from eventml.sources import DAY
from eventml.splits import split_decisions, with_person_folds
from eventml.worlds.lending import simulate
from ml_assets.models import REGISTERED_MODEL
from ml_assets.serving import risk_service_bento
from resources.bento import Serving
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking

TINY_ENCODER = SequenceModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=16, epochs=1)


def train_tiny(tables: DeltaTables, spec) -> RiskModel:
    events = tables.scan("raw_events").drop(DAY).collect()
    splits = tables.scan("training_splits").collect()
    features = tables.scan("decision_features").collect()
    sequence_model, _ = train_sequence_model(
        events, splits, spec, TINY_ENCODER, log=lambda *_: None
    )
    feature_set = spec.feature_set()
    outputs = embedding_table(sequence_model, events, splits)
    table = model_table(splits, features, outputs)
    names = feature_set.names + sequence_model.probability_names
    scorer = Scorer.fit(
        table.filter(pl.col("split") == "train"), table.filter(pl.col("split") == "valid"), names,
        [label.name for label in spec.labels], ScorerConfig(n_estimators=30), log=lambda *_: None,
    )  # fmt: skip
    return RiskModel(sequence_model, scorer, feature_set, DecisionPolicy(spec.policy))


def register_champion(mlflow_tracking: MlflowTracking, model: RiskModel) -> str:
    import mlflow

    with (
        mlflow_tracking.start_run("tiny_risk_model", {"test": "e2e"}) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_artifacts(str(model.save(tmp)), "risk_model")
    return mlflow_tracking.register(
        REGISTERED_MODEL, run.info.run_id, "risk_model", alias="champion"
    )


@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """Everything the service needs, built the way the code location builds it."""
    root = tmp_path_factory.mktemp("e2e")
    tables = DeltaTables(root_uri=str(root / "tables"))
    source = EventSource(n_users=500, fault_rate=0.0)
    serving = Serving.under(root)
    mlflow_tracking = MlflowTracking.embedded(root / "mlflow")
    resources = {"tables": tables, "io_manager": tables.io_manager(), "event_source": source,
                 "serving": serving, "mlflow_tracking": mlflow_tracking}  # fmt: skip
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"e2e setup: {what} {time.perf_counter() - clock:.1f} s")
        clock = time.perf_counter()

    spec = source.spec()
    with dg.DagsterInstance.ephemeral() as instance:
        # The world's tables written directly (the ingest and features groups have their own
        # tests, and running them over a year costs minutes); the serving assets run in Dagster.
        events = simulate(source.world())
        splits = with_person_folds(split_decisions(build_decisions(events, spec), spec))
        features = spec.compute_features(events, splits)
        events.with_columns(pl.col("ts").dt.date().alias(DAY)).write_delta(tables.uri("raw_events"))
        splits.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String)).write_delta(
            tables.uri("training_splits")
        )
        features.write_delta(tables.uri("decision_features"))
        lap("a year of events, decisions and features")
        serving.store(spec).write(
            events
        )  # what `online_store` publishes (tests/ml_assets/test_serving.py)
        lap("online store")
        model = train_tiny(tables, spec)
        lap("tiny model")
        version = register_champion(mlflow_tracking, model)
        lap("registered")
        built = dg.materialize([risk_service_bento], resources=resources, instance=instance)
        lap("risk_service_bento")
        yield {"root": root, "tables": tables, "serving": serving, "model": model, "version": version,
               "spec": spec, "result": built, "resources": resources, "instance": instance}  # fmt: skip


@pytest.fixture(scope="session")
def bento_tag(deployed) -> str:
    return (
        deployed["result"]
        .asset_materializations_for_node("risk_service_bento")[0]
        .metadata["bento_tag"]
        .value
    )


@pytest.fixture(scope="session")
def url(deployed, bento_tag):
    serving = deployed["serving"]
    with serving.serve(bento_tag, log_path=deployed["root"] / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def client(url):
    import bentoml

    with bentoml.SyncHTTPClient(url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def test_decisions(deployed) -> pl.DataFrame:
    return deployed["tables"].scan("training_splits").filter(pl.col("split") == "test").collect()


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
