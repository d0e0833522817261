"""The models on a Ray cluster (a local one of two CPUs, started once per session): the encoder
trained data-parallel on two Ray Train workers learns as well as in one process, within the
spread of seeds, and saves the same artifact; both scorers' boosters trained on two XGBoost
workers rank as well as in one process; Ray Data's batch inference gives every decision the
embedding and the scores the in-process path gives."""

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score
from test_scorer import CONFIG, FEATURES, world  # the scorer tests' synthetic rows

from eventml.cluster import RayTrain, embedding_table_by_parts, probability_table_by_parts
from eventml.embedding import (
    SequenceModel,
    SequenceModelConfig,
    embedding_table,
    train_sequence_model,
)
from eventml.encoder_data import EventTable
from eventml.labels import build_decisions
from eventml.scorer import Scorer, ScorerConfig
from eventml.sources import DAY
from eventml.splits import split_decisions, with_person_folds
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, simulate

ENCODER = SequenceModelConfig(epochs=3, d_model=16, n_layers=1, n_heads=2, max_len=32, emb_dim=8)
TASKS = ["default_90d", "fraud_60d"]


@pytest.fixture(scope="module")
def lending(ray_cluster, tmp_path_factory):
    """The world's events, the same events as a Delta table partitioned by day (as `raw_events`
    is), its decisions' splits, and Ray Train on two workers."""
    events = simulate(WorldConfig(n_users=400, n_days=300, seed=5))
    splits = with_person_folds(split_decisions(build_decisions(events, LENDING_PACK), LENDING_PACK))
    table = str(tmp_path_factory.mktemp("tables") / "raw_events")
    events.with_columns(pl.col("ts").dt.date().alias(DAY)).write_delta(
        table, delta_write_options={"partition_by": [DAY]}
    )
    storage = str(tmp_path_factory.mktemp("ray"))
    return events, EventTable(table, 0), splits, RayTrain(workers=2, storage_path=storage, parts=5)


def valid_auc(events, splits, seed: int, trainer=None) -> tuple[float, SequenceModel]:
    """The folds' encoders' mean validation AUC, and the model."""
    config = SequenceModelConfig(**{**ENCODER.__dict__, "seed": seed})
    options = {"trainer": trainer} if trainer else {}
    model, results = train_sequence_model(
        events, splits, LENDING_PACK, config, log=lambda line: None, **options
    )
    return float(np.mean([result.best_metric for result in results])), model


@pytest.fixture(scope="module")
def encoder_on_ray(lending) -> tuple[float, SequenceModel]:
    """Trained from the table: five tasks each build one part of the entities' sequences from
    those entities' events, and each worker trains on its parts where the object store holds
    them."""
    _, table, splits, ray_train = lending
    return valid_auc(table, splits, 0, trainer=ray_train.train_encoder)


def test_the_encoder_trained_on_two_workers_learns_as_well_as_in_one_process(
    lending, encoder_on_ray, tmp_path
):
    events, _, splits, _ = lending
    in_process = [valid_auc(events, splits, seed)[0] for seed in (0, 1, 2)]
    on_ray, model = encoder_on_ray
    spread = max(in_process) - min(in_process)
    assert min(in_process) - max(spread, 0.02) <= on_ray <= max(in_process) + max(spread, 0.02)
    # The same artifact: state_dict + JSON, loaded with weights_only, gives the same outputs.
    reloaded = SequenceModel.load(model.save(tmp_path))
    arrays, folds = model.arrays(events, splits.head(200)), splits.head(200)["fold"].to_numpy()
    mine = model.output_columns(arrays, folds, embeddings=True)
    theirs = reloaded.output_columns(arrays, folds, embeddings=True)
    assert all(np.array_equal(mine[c], theirs[c]) for c in model.output_names)


def test_the_boosters_trained_on_two_workers_rank_as_well_as_in_one_process(lending):
    *_, ray_train = lending
    train, valid, test = world(20_000, 2), world(10_000, 3), world(20_000, 4)

    def test_auc(seed: int, **options) -> dict[str, float]:
        config = ScorerConfig(**{**CONFIG.__dict__, "n_threads": 1, "seed": seed})
        scorer = Scorer.fit(train, valid, FEATURES, TASKS, config, log=lambda _: None, **options)
        assert scorer.calibration.keys() == set(TASKS)
        labelled = {task: test.filter(pl.col(task).is_not_null()) for task in TASKS}
        return {task: roc_auc_score(rows[task], scorer.predict(rows)[task])
                for task, rows in labelled.items()}  # fmt: skip

    seeds = [test_auc(seed) for seed in (0, 1, 2)]
    on_ray = test_auc(0, booster_trainer=ray_train.train_boosters)
    for task in TASKS:
        low, high = min(s[task] for s in seeds), max(s[task] for s in seeds)
        assert low - 0.01 <= on_ray[task] <= high + 0.01, (task, on_ray[task], low, high)


def test_ray_data_gives_every_decision_the_outputs_of_the_in_process_path(lending):
    events, table, splits, _ = lending
    _, model = valid_auc(events, splits, 0)
    uri = table.uri
    # Any order comes back as given; each person scored by the other fold's encoder there too.
    decisions = splits.sample(fraction=1.0, shuffle=True, seed=0)
    expected = embedding_table(model, events, decisions)
    on_ray = embedding_table_by_parts(model, uri, 0, decisions, parts=5, workers=2)
    assert on_ray["decision_id"].equals(decisions["decision_id"])
    assert on_ray.columns == expected.columns and on_ray.null_count().sum_horizontal().item() == 0
    for column in expected.columns[1:]:
        assert np.allclose(on_ray[column], expected[column], atol=1e-5), column


def test_ray_data_gives_every_row_the_scorers_in_process_probabilities(ray_cluster):
    scorer = Scorer.fit(
        world(4_000, 2), world(2_000, 3), FEATURES, TASKS, CONFIG, log=lambda _: None
    )
    test = world(3_000, 4).with_columns(
        pl.format("d{}", pl.int_range(pl.len())).alias("decision_id")
    )
    on_ray = probability_table_by_parts(scorer, test, parts=5, workers=2)
    assert on_ray.equals(scorer.probability_table(test))  # every row, in the table's order
