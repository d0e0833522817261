"""The training half, run for real on a small world: encoder → embeddings → scorers →
out-of-time evaluation → promotion, with MLflow (SQLite) as the registry."""

import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from eventml.promotion import champion_on
from eventml.risk_model import RiskModel, model_table
from ml_assets.evaluation import _champion_scores
from ml_assets.models import REGISTERED_MODEL


def auc(evaluation: pl.DataFrame, model: str, task: str = "fraud_60d") -> float:
    """The AUC of the task promotion decides on in the small world (see conftest)."""
    return evaluation.filter((pl.col("model") == model) & (pl.col("task") == task))["auc"][0]


@pytest.fixture(scope="module")
def world(small_world_trained):
    return small_world_trained


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
    # The one ingest run: the table's first version with rows (version 0 is its empty creation).
    assert run.data.tags["delta_version.raw_events"] == str(trained.tables.version("raw_events"))
    assert run.data.tags.get("raw_events.days") == "2025-01-01..2025-12-31"
    assert run.data.tags["git_commit"]


def test_every_decision_is_scored_by_the_risk_scorer_it_was_trained_with(world):
    """`decision_scores`: each decision of the splits once, in its split, with the probabilities
    the newest risk model gives its row."""
    trained, instance, _ = world
    assert trained.run(instance, ["decision_scores"]).success
    model = RiskModel.load(trained.models.current_path(dg.AssetKey("risk_scorer")))
    splits = trained.tables.scan("training_splits").collect()
    table = model_table(
        splits,
        trained.tables.scan("decision_features").collect(),
        trained.tables.scan("decision_embeddings").collect(),
    )
    scores = trained.tables.scan("decision_scores").collect()
    assert scores.height == table.height == splits.height
    scored = table.select("decision_id", "split").join(
        scores, on="decision_id", how="left", maintain_order="left"
    )
    assert scored["split"].equals(scored["split_right"])
    for task, p in model.scorer.predict(table).items():
        np.testing.assert_array_equal(scored[f"p_{task}"].to_numpy(), p)


def test_a_worse_challenger_is_refused_and_the_alias_stays(world, scorer_settings):
    trained, instance, _ = world
    before = trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion").version
    trained.run(
        instance,
        ["risk_scorer", "model_evaluation", "champion"],
        # One tree that may not split: the same score for everyone.
        scorer=scorer_settings(n_estimators=1, max_depth=1, min_child_weight=1e9),
    )
    evaluation = trained.tables.scan("model_evaluation").collect()
    assert "champion" in set(evaluation["model"]), (
        evaluation
    )  # the incumbent, scored on the same rows
    assert auc(evaluation, "challenger") < auc(evaluation, "champion"), evaluation  # the premise
    assert trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion").version == before
    last = trained.audit().row(-1, named=True)
    assert last["action"] == "refused" and "does not reach the champion" in last["reasons"]


def test_a_better_challenger_is_promoted_and_the_audit_answers_who_served_when(world):
    trained, instance, _ = world
    trained.run(instance, ["risk_scorer", "model_evaluation", "champion"])
    evaluation = trained.tables.scan("model_evaluation").collect()
    assert auc(evaluation, "challenger") > auc(evaluation, "champion")  # the premise: it is better
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
        reloaded = RiskModel.load(
            trained.mlflow.download(REGISTERED_MODEL, str(version), Path(tmp))
        )
    table = model_table(
        trained.tables.scan("training_splits").collect().filter(pl.col("split") == "test"),
        trained.tables.scan("decision_features").collect(),
        trained.tables.scan("decision_embeddings").collect(),
    )
    for task, p in trained_model.scorer.predict(table).items():
        assert np.array_equal(reloaded.scorer.predict(table)[task], p)


def test_the_champion_is_scored_with_its_own_encoder_whatever_the_challengers_reads(world):
    """The test rows carry the challenger's encoder columns; the champion must be scored on its
    own encoder's, or a retrained encoder would make any champion look broken. Runs after the
    promotion above, so the champion is a full model that reads its encoders' probabilities."""
    trained, _, _ = world
    champion = trained.mlflow.version_by_alias(REGISTERED_MODEL, "champion")
    with tempfile.TemporaryDirectory() as tmp:
        model = RiskModel.load(
            trained.mlflow.download(REGISTERED_MODEL, str(champion.version), Path(tmp))
        )
    test = model_table(
        trained.tables.scan("training_splits").collect().filter(pl.col("split") == "test"),
        trained.tables.scan("decision_features").collect(),
        trained.tables.scan("decision_embeddings").collect(),
    )
    decisions = trained.tables.scan("decisions").collect()
    raw_events = trained.tables.scan("raw_events")
    from_encoder = model.sequence_model.output_names
    rows = decisions.join(test.select("decision_id"), on="decision_id")  # as it embeds them
    own = model.scorer.predict(
        test.drop(from_encoder).join(
            model.embed_decisions(raw_events.drop("day").collect(), rows),
            on="decision_id",
            how="left",
            maintain_order="left",
        )
    )
    foreign = test.with_columns(pl.lit(0.0).alias(c) for c in from_encoder)
    # The premise (the champion is then the promoted full model): its scores depend on them.
    assert any(not np.array_equal(model.scorer.predict(foreign)[t], p) for t, p in own.items())
    version, scores = _champion_scores(
        trained.mlflow, "another version", foreign, decisions, raw_events, lambda *_: None
    )
    assert version == str(champion.version)
    for task, p in own.items():
        np.testing.assert_array_equal(scores[task], p)
