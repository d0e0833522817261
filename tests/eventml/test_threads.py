"""eventml.threads: every CPU-heavy step's threads come from one setting, with a default derived
from the cores the process is given; the libraries' pools follow it; and with the threads fixed,
the encoder trains the same weights whether or not another process shares the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eventml.encoder import Encoder, EncoderConfig, TrainConfig, train
from eventml.scorer import ScorerConfig
from eventml.threads import POOL_VARIABLES, cores_given, step_threads, use_step_threads
from tests.conftest import REPO


@pytest.fixture
def budget(monkeypatch):
    for name in ("EVENTML_THREADS", "EVENTML_STEPS_AT_ONCE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_step_gets_its_share_of_the_cores_it_is_given(budget):
    assert 1 <= cores_given() <= len(os.sched_getaffinity(0))
    assert step_threads() == cores_given()
    budget.setenv("EVENTML_STEPS_AT_ONCE", "2")
    assert step_threads() == max(1, cores_given() // 2)
    budget.setenv("EVENTML_STEPS_AT_ONCE", str(cores_given() + 1))
    assert step_threads() == 1
    budget.setenv("EVENTML_THREADS", "3")
    assert step_threads() == 3
    assert ScorerConfig().params([])["nthread"] == 3
    assert ScorerConfig(n_threads=1).params([])["nthread"] == 1


@pytest.mark.parametrize("name", ["EVENTML_THREADS", "EVENTML_STEPS_AT_ONCE"])
@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_budget_that_is_not_a_count_of_threads_says_which_setting(budget, name, value):
    budget.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}'.*at least 1"):
        step_threads()


def test_the_code_locations_processes_size_every_pool_to_the_budget():
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_NUM_THREADS", "_MAX_THREADS"))}
    probe = (
        "import ml_assets, torch, polars, xgboost\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = {p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}\n"
        "print(torch.get_num_threads(), polars.thread_pool_size(), sorted(blas))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**env, "EVENTML_THREADS": "1"}, check=True)  # fmt: skip
    assert done.stdout.split("\n")[0] == "1 1 [1]"


def test_torch_follows_the_budget_when_it_was_imported_first(budget):
    before = torch.get_num_threads()
    budget.setenv("EVENTML_THREADS", "1")
    for name in POOL_VARIABLES:  # unset, and restored after: what use_step_threads writes
        budget.delenv(name, raising=False)
    try:
        assert use_step_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def encoder_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small encoder trained for an epoch: wide enough that its matrix products and sums are
    split over the threads (a tiny one runs on one thread whatever the budget)."""
    rng = np.random.default_rng(seed)
    n, k = 512, 64
    mask = np.arange(k)[None, :] >= (k - rng.integers(1, k + 1, n))[:, None]
    data = {
        "event_type": (rng.integers(1, 6, (n, k)) * mask).astype(np.int32),
        "cats": (rng.integers(1, 5, (n, k, 2)) * mask[..., None]).astype(np.int32),
        "nums": (rng.normal(size=(n, k, 4)) * mask[..., None]).astype(np.float32),
        "time": (rng.normal(size=(n, k, 6)) * mask[..., None]).astype(np.float32),
        "mask": mask,
        "labels": rng.integers(0, 2, (n, 1)).astype(np.float32),
    }
    torch.manual_seed(seed)
    model = Encoder(EncoderConfig(n_event_types=6, cat_cardinalities=(7, 5), n_numeric=4,
                                  n_time_features=6, max_len=k, d_model=64, n_layers=2, n_heads=4,
                                  tasks=("late",), task_weights=(1.0,)))  # fmt: skip
    train(model, data, None, TrainConfig(epochs=1, batch_size=128, warmup_steps=2, seed=seed))
    return model.state_dict()


def test_the_same_threads_train_the_same_weights_beside_a_busy_neighbour():
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, cores_given()))  # the pools split the work, as in a step
    spinners = []
    try:
        alone = encoder_weights()
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(cores_given())]  # fmt: skip
        beside = encoder_weights()
    finally:
        torch.set_num_threads(before)
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert all(torch.equal(alone[name], beside[name]) for name in alone)
