"""The sequence model bound to the event table: the same data and config train the same model."""

import polars as pl
import pytest
import torch

from eventml.embedding import SequenceModelConfig, train_sequence_model
from eventml.labels import build_decisions
from eventml.simulate import LENDING_SPEC, WorldConfig, simulate
from eventml.splits import split_decisions, with_stacking_stages


@pytest.fixture(scope="module")
def world():
    events = simulate(WorldConfig(n_users=150, n_days=260, seed=3))
    splits = with_stacking_stages(
        split_decisions(build_decisions(events, LENDING_SPEC), LENDING_SPEC)
    )
    return events, splits


def weights(events, splits, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    config = SequenceModelConfig(
        epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4, seed=seed, **overrides
    )
    model, _ = train_sequence_model(events, splits, LENDING_SPEC, config, log=lambda line: None)
    return model.encoder.state_dict()


def test_the_same_data_and_seed_train_the_same_model_whatever_ran_before(world):
    first = weights(*world, seed=0)
    torch.rand(1000)  # whatever else drew from torch's global generator in between
    again = weights(*world, seed=0)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_seed_is_what_changes_the_model(world):
    a, b = weights(*world, seed=0), weights(*world, seed=1)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def flipped(splits: pl.DataFrame) -> pl.DataFrame:
    return splits.with_columns((1 - pl.col(t)).alias(t) for t in ("default_90d", "fraud_60d"))


@pytest.mark.parametrize("label_free", [True, False])
def test_a_label_free_embedding_is_the_same_whatever_the_labels_say(world, label_free):
    events, splits = world
    a = weights(events, splits, label_free_embedding=label_free)
    b = weights(events, flipped(splits), label_free_embedding=label_free)
    trunk = [k for k in a if not k.startswith("task_head")]
    assert not torch.equal(a["task_head.weight"], b["task_head.weight"])  # the heads learn labels
    assert all(torch.equal(a[k], b[k]) for k in trunk) == label_free


def test_a_label_shaped_embedding_needs_rows_held_back_for_it(world):
    events, splits = world
    everything_to_the_scorers = with_stacking_stages(splits.drop("stage"), encoder_share=0.0)
    with pytest.raises(ValueError, match="encoder_share"):
        weights(events, everything_to_the_scorers, label_free_embedding=False)
    weights(events, everything_to_the_scorers, label_free_embedding=True)
