"""Evaluation metrics mean what a reviewer expects them to mean."""

import numpy as np
import pytest

from eventml.evaluate import (
    calibration_plot,
    calibration_table,
    expected_calibration_error,
    metrics,
    metrics_by_segment,
    roc_plot,
)

rng = np.random.default_rng(0)
P = rng.uniform(0, 0.3, 20_000)
Y = (rng.uniform(size=P.size) < P).astype(int)  # outcomes drawn from P: P is calibrated


def test_a_calibrated_score_has_small_ece_and_a_miscalibrated_one_does_not():
    assert expected_calibration_error(Y, P) < 0.01
    assert expected_calibration_error(Y, np.clip(P * 2, 0, 1)) > 0.05


def test_a_perfect_ranking_scores_one_and_a_random_one_half():
    m = metrics(Y, Y + 0.0)
    assert m.auc == 1.0 and m.gini == 1.0 and m.ks == 1.0
    assert metrics(Y, rng.uniform(size=Y.size)).auc == pytest.approx(0.5, abs=0.03)


def test_gini_is_two_auc_minus_one_and_rates_are_counted():
    m = metrics(Y, P)
    assert m.gini == pytest.approx(2 * m.auc - 1)
    assert m.n == Y.size and m.positives == Y.sum() and m.rate == pytest.approx(Y.mean())
    assert 0 < m.brier < 0.25 and 0 < m.pr_auc < 1


def test_one_class_gives_nan_not_an_exception():
    m = metrics(np.zeros(10), np.linspace(0, 1, 10))
    assert np.isnan(m.auc) and np.isnan(m.ks) and m.positives == 0


def test_calibration_table_has_deciles_that_cover_every_row():
    table = calibration_table(Y, P)
    assert table.height == 10 and table["n"].sum() == Y.size
    assert (table["predicted"].diff().drop_nulls() > 0).all()


def test_segments_split_the_rows():
    seg = np.where(np.arange(Y.size) % 3 == 0, "new", "returning")
    table = metrics_by_segment(Y, P, {"tenure": seg})
    assert table["n"].sum() == Y.size and set(table["value"]) == {"new", "returning"}


def test_plots_are_png():
    assert roc_plot(Y, {"model": P}, "ROC")[:8] == b"\x89PNG\r\n\x1a\n"
    assert calibration_plot(Y, {"model": P}, "calibration")[:4] == b"\x89PNG"
