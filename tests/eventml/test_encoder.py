"""eventml.encoder: padding is invisible, missing labels teach nothing, training is reproducible
and can fit, and a saved encoder comes back identical without unpickling anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eventml.encoder import (
    Encoder,
    EncoderConfig,
    TrainConfig,
    embed,
    evaluate,
    iter_batches,
    iter_part_batches,
    masked_bce,
    predict,
    roc_auc,
    save,
    train,
)

K, C, F, T = 16, 2, 4, 6


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run faster on one thread than on threads that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**overrides) -> EncoderConfig:
    base = dict(
        n_event_types=6,
        cat_cardinalities=(7, 5),
        n_numeric=F,
        n_time_features=T,
        max_len=K,
        d_model=16,
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        emb_dim=8,
        tasks=("many_late", "never_late"),
        task_weights=(1.0, 1.0),
    )
    return EncoderConfig(**{**base, **overrides})


def arrays(n: int = 64, seed: int = 0, missing: float = 0.25) -> dict[str, np.ndarray]:
    """Right-aligned histories of 0..K events whose labels depend on what happened."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, K + 1, n)
    mask = np.arange(K)[None, :] >= (K - lengths)[:, None]
    event_type = rng.integers(1, 6, (n, K)) * mask
    late = (event_type == 3).sum(1)
    labels = np.stack([late >= 3, late == 0], axis=1).astype(np.float32)
    labels[rng.random((n, 2)) < missing] = np.nan  # unmatured
    return {
        "event_type": event_type.astype(np.int32),
        "cats": (rng.integers(1, 5, (n, K, C)) * mask[..., None]).astype(np.int32),
        "nums": (rng.normal(size=(n, K, F)) * mask[..., None]).astype(np.float32),
        "time": (rng.normal(size=(n, K, T)) * mask[..., None]).astype(np.float32),
        "mask": mask,
        "labels": labels,
    }


def whole(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return next(iter_batches(data, len(data["mask"])))


def model(seed: int = 0, **overrides) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(config(**overrides)).eval()


@pytest.mark.parametrize("aux_task", ["masked_event", "next_event"])
def test_whatever_padding_holds_the_outputs_are_identical(aux_task):
    m = model(aux_task=aux_task)
    batch = whole(arrays())
    pad = ~batch["mask"]
    g = torch.Generator().manual_seed(1)
    noisy = dict(batch)
    noisy["event_type"] = torch.where(
        pad, torch.randint(1, 6, pad.shape, generator=g), batch["event_type"]
    )
    noisy["cats"] = torch.where(
        pad[..., None], torch.randint(0, 5, batch["cats"].shape, generator=g), batch["cats"]
    )
    noisy["nums"] = batch["nums"].masked_fill(pad[..., None], float("nan"))
    noisy["time"] = batch["time"].masked_fill(pad[..., None], 1e9)
    with torch.no_grad():
        a, b = m(batch), m(noisy)
    for key in ("emb", "logits", "loss"):
        assert torch.equal(a[key], b[key]), key
    real = batch["mask"]
    assert torch.equal(a["aux_logits"][real], b["aux_logits"][real])


def test_cutting_all_padding_columns_changes_nothing():
    m = model()
    data = arrays()
    short = {k: v for k, v in data.items()}
    for k in ("event_type", "cats", "nums", "time", "mask"):
        short[k] = data[k][:, K // 2 :]
    keep = data["mask"].sum(1) <= K // 2  # rows whose every event survives the cut
    with torch.no_grad():
        full = m(whole(data))["emb"][torch.as_tensor(keep)]
        cut = m(whole(short))["emb"][torch.as_tensor(keep)]
    torch.testing.assert_close(full, cut, rtol=1e-5, atol=1e-6)


def test_an_empty_history_has_a_finite_embedding_and_loss():
    data = arrays(8)
    for k in ("event_type", "cats", "nums", "time"):
        data[k] = np.zeros_like(data[k])
    data["mask"] = np.zeros_like(data["mask"])
    for aux_task in ("masked_event", "next_event"):
        m = model(aux_task=aux_task).train()
        out = m(whole(data))
        assert torch.isfinite(out["emb"]).all() and torch.isfinite(out["loss"])
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_missing_labels_contribute_neither_loss_nor_gradient():
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([[1, np.nan], [0, 1], [np.nan, np.nan], [1, 0], [np.nan, 1], [0, np.nan]])
    loss = masked_bce(logits, labels, torch.ones(2))
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[torch.isnan(labels)] == 0).all()
    assert (logits.grad[~torch.isnan(labels)] != 0).all()
    # Changing the logit of a missing label leaves the loss unchanged.
    moved = logits.detach().clone()
    moved[torch.isnan(labels)] += 10.0
    assert masked_bce(moved, labels, torch.ones(2)) == pytest.approx(loss.item())

    # A model whose batch has no known label (and no aux task) receives no gradient at all.
    m = model(aux_weight=0.0).train()
    data = arrays(16)
    data["labels"][:] = np.nan
    out = m(whole(data))
    out["loss"].backward()
    assert out["loss"].item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("aux_task", ["masked_event", "next_event"])
def test_the_aux_task_learns_from_unlabelled_sequences(aux_task):
    m = model(aux_task=aux_task).train()
    data = arrays(32)
    data["labels"][:] = np.nan
    out = m(whole(data))
    assert out["task_loss"].item() == 0.0 and out["aux_loss"].item() > 0.0
    out["loss"].backward()
    assert m.wte.weight.grad.abs().sum() > 0


def test_outlook_targets_train_the_embedding_and_unknown_ones_teach_nothing():
    m = model(outlook=("late_30d", "apply_30d"), aux_weight=0.0).train()
    data = arrays(32, missing=1.0)  # no decision label at all
    late_soon = (data["event_type"][:, -4:] == 3).any(1)
    data["outlook"] = np.stack([late_soon, ~late_soon], axis=1).astype(np.float32)
    data["outlook"][::3] = np.nan  # outlooks reaching past what may be learned from
    out = m(whole(data))
    assert out["task_loss"].item() == 0.0 and out["outlook_loss"].item() > 0.0
    out["loss"].backward()
    # The projection to the embedding learns, which masked events alone never teach it.
    assert m.to_emb.weight.grad.abs().sum() > 0 and m.task_head.weight.grad.abs().sum() == 0

    m.zero_grad()
    data["outlook"][:] = np.nan
    out = m(whole(data))
    out["loss"].backward()
    assert out["loss"].item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


def test_the_same_seed_trains_the_same_weights():
    data, valid = arrays(64, seed=0), arrays(32, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=16, warmup_steps=2, seed=3)

    def weights(train_seed: int) -> dict[str, torch.Tensor]:
        m = model(seed=0, dropout=0.1)
        train(m, data, valid, TrainConfig(**{**cfg.__dict__, "seed": train_seed}))
        return m.state_dict()

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_tiny_model_fits_a_tiny_training_set():
    data = arrays(32, seed=2, missing=0.0)
    late = data["event_type"] == 3
    data["labels"] = np.stack([late.any(1), late[:, -1]], axis=1).astype(
        np.float32
    )  # ever late; latest late
    m = model(seed=0, d_model=32, n_heads=4, aux_weight=0.0)  # the supervised path alone
    lines = []
    fit = TrainConfig(
        epochs=50,
        batch_size=8,
        # 3e-3 left it on a plateau (one task unfit) in some processes and not others: the
        # trajectory is chaotic at the last float; 1e-2 fits on every seed tried, far from it.
        lr=1e-2,
        min_lr_ratio=1.0,
        warmup_steps=5,
        patience=50,
        monitor="auc",
    )
    result = train(m, data, data, fit, log=lines.append)
    history = result.history
    assert history[-1]["train_task_loss"] < 0.3 * history[0]["train_task_loss"]
    assert result.history[result.best_epoch]["valid_mean_auc"] == 1.0
    probs = predict(m, data)
    for j, task in enumerate(m.config.tasks):
        assert roc_auc(data["labels"][:, j], probs[task]) == 1.0
    assert lines[0].startswith("epoch 0") and "restored epoch" in lines[-1]


def test_training_stops_early_and_keeps_the_best_epoch():
    data, valid = arrays(64, seed=0), arrays(32, seed=5)
    m = model()
    result = train(
        m, data, valid, TrainConfig(epochs=40, batch_size=16, lr=3e-2, warmup_steps=1, patience=2)
    )
    monitored = [row["monitored"] for row in result.history]
    assert len(monitored) < 40
    assert result.best_metric == min(monitored) == monitored[result.best_epoch]
    restored = evaluate(m, valid)["valid_loss"]
    assert restored == pytest.approx(result.best_metric, rel=1e-5)


def test_without_any_label_the_self_supervised_loss_picks_the_epoch_to_keep():
    unlabeled = arrays(64, seed=0, missing=1.0)
    result = train(
        model(), unlabeled, None, TrainConfig(epochs=4, batch_size=16, lr=3e-2, warmup_steps=1)
    )
    monitored = [row["monitored"] for row in result.history]
    assert all(row["train_task_loss"] == 0.0 for row in result.history)
    assert monitored == [row["train_loss"] for row in result.history]
    assert result.best_metric == min(monitored) < monitored[0]


def test_save_then_load_gives_identical_outputs_from_weights_only(tmp_path):
    m = model(seed=7)
    data = arrays(16)
    save(torch.compile(m), tmp_path)  # a compiled wrapper is unwrapped: no "_orig_mod." keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "state_dict.pt"]
    state = torch.load(tmp_path / "state_dict.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    assert EncoderConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == m.config

    loaded = Encoder.load(tmp_path)
    np.testing.assert_array_equal(embed(loaded, data), embed(m, data))
    for task, probs in predict(loaded, data).items():
        np.testing.assert_array_equal(probs, predict(m, data)[task])


def test_embed_and_predict_return_one_row_per_sequence_in_order():
    m = model()
    data = arrays(40)
    emb = embed(m, data, batch_size=16)
    assert emb.shape == (40, m.config.emb_dim) and np.isfinite(emb).all()
    reversed_data = {k: v[::-1].copy() for k, v in data.items()}
    np.testing.assert_allclose(
        embed(m, reversed_data, batch_size=16), emb[::-1], rtol=1e-5, atol=1e-6
    )
    probs = predict(m, data)
    assert set(probs) == {"many_late", "never_late"}
    assert all(p.shape == (40,) and ((p > 0) & (p < 1)).all() for p in probs.values())


def test_roc_auc_is_the_rank_statistic_with_ties_averaged():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    # pairs (pos, neg) ordered correctly, ties counting one half
    pos, neg = p[y == 1], p[y == 0]
    expected = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert roc_auc(y, p) == pytest.approx(expected)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_a_config_that_cannot_work_says_what_to_change():
    with pytest.raises(ValueError, match="one weight per task"):
        config(task_weights=(1.0,))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        config(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="'masked_event' or 'next_event'"):
        config(aux_task="contrastive")


def test_rows_in_parts_are_drawn_from_where_they_lie_each_row_at_most_once_an_epoch():
    data = arrays(200)
    data["time"][:, -1, 0] = np.arange(200)  # which row a batch's row came from
    parts = [{k: v[i::3] for k, v in data.items()} for i in range(3)]  # 67, 67 and 66 rows
    one = [b["time"] for b in iter_part_batches([data], 32, seed=4)]
    alike = [b["time"] for b in iter_batches(data, 32, shuffle=True, seed=4, drop_last=True)]
    assert len(one) == len(alike) == 6 and all(map(torch.equal, one, alike))

    def epoch(steps=None) -> list[np.ndarray]:
        batches = iter_part_batches(parts, 16, seed=4, steps=steps)
        return [batch["time"][:, -1, 0].long().numpy() for batch in batches]

    batches = epoch()
    assert len(batches) == 3 * 4  # each part's whole batches of 16, its short last one dropped
    drawn = np.concatenate(batches)
    assert len(np.unique(drawn)) == len(drawn) == 3 * 4 * 16
    assert all(len({row % 3 for row in rows}) == 1 for rows in batches)  # each from one part
    assert len(epoch(steps=5)) == 5  # a data-parallel replica takes the group's steps
