"""The sequence model bound to the event table: the same data and config train the same model."""

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


def weights(events, splits, seed: int) -> dict[str, torch.Tensor]:
    config = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4, seed=seed)
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
