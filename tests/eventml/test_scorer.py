"""The scorer: per-task XGBoost, monotone where declared, explainable, reloadable exactly."""

import numpy as np
import polars as pl
import pytest

from eventml.scorer import Scorer, ScorerConfig, to_matrix

rng = np.random.default_rng(1)
N = 4_000
FEATURES = ["late_payments_30d", "income", "noise", "emb_0", "emb_1"]
REASON_OF = {
    "late_payments_30d": "recent late payments",
    "income": "income band",
    "noise": "other",
    "emb_0": "recent activity pattern",
    "emb_1": "recent activity pattern",
}


def world(n: int, seed: int) -> pl.DataFrame:
    r = np.random.default_rng(seed)
    late = r.poisson(1.0, n).astype(float)
    income = r.normal(0, 1, n)
    emb = r.normal(0, 1, (n, 2))
    logit = -3 + 0.9 * late - 0.7 * income + 0.8 * emb[:, 0] * emb[:, 1]
    default = (r.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(float)
    fraud = (r.uniform(size=n) < 0.02 + 0.1 * (emb[:, 1] > 1.5)).astype(float)
    frame = pl.DataFrame(
        {"late_payments_30d": late, "income": income, "noise": r.normal(size=n), "emb_0": emb[:, 0], "emb_1": emb[:, 1],
         "default_90d": default, "fraud_60d": fraud}
    )
    # a tenth of the default labels are unmatured: null
    return frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0).then(None).otherwise(pl.col("default_90d")).alias("default_90d")
    )


CONFIG = ScorerConfig(n_estimators=150, learning_rate=0.1, max_depth=3, monotone={"late_payments_30d": 1})


@pytest.fixture(scope="module")
def fitted() -> tuple[Scorer, pl.DataFrame]:
    scorer = Scorer.fit(world(N, 2), world(N // 2, 3), FEATURES, ["default_90d", "fraud_60d"], CONFIG, log=lambda _: None)
    return scorer, world(1_000, 4)


def test_it_learns_the_signal(fitted):
    from sklearn.metrics import roc_auc_score

    scorer, test = fitted
    labelled = test.filter(pl.col("default_90d").is_not_null())
    assert roc_auc_score(labelled["default_90d"], scorer.predict(labelled)["default_90d"]) > 0.75


def test_reason_contributions_add_up_to_the_margin(fitted):
    scorer, test = fitted
    contribs = scorer.contributions(test, "default_90d")
    assert np.allclose(contribs.sum(axis=1), scorer.margins(test, "default_90d"), atol=1e-4)


def test_reasons_are_declared_ones_pushing_risk_up_largest_first(fitted):
    scorer, test = fitted
    declared = set(REASON_OF.values())
    for row in scorer.reasons(test, "default_90d", REASON_OF):
        assert len(row) <= 4
        assert {r["reason"] for r in row} <= declared
        contributions = [r["contribution"] for r in row]
        assert all(c > 0 for c in contributions) and contributions == sorted(contributions, reverse=True)


def test_embedding_dimensions_roll_up_into_one_reason(fitted):
    scorer, test = fitted
    for row in scorer.reasons(test, "fraud_60d", REASON_OF):
        names = [r["reason"] for r in row]
        assert len(names) == len(set(names))


def test_raising_a_monotone_feature_never_lowers_the_score(fitted):
    scorer, test = fitted
    base = scorer.predict(test)["default_90d"]
    for bump in (1.0, 3.0, 10.0):
        raised = scorer.predict(test.with_columns(pl.col("late_payments_30d") + bump))["default_90d"]
        assert (raised >= base - 1e-7).all()


def test_a_reloaded_scorer_predicts_exactly_the_same(fitted, tmp_path):
    scorer, test = fitted
    loaded = Scorer.load(scorer.save(tmp_path / "scorer"))
    for task, p in scorer.predict(test).items():
        assert np.array_equal(loaded.predict(test)[task], p)
    assert loaded.feature_names == scorer.feature_names and loaded.config == scorer.config


def test_rows_in_matrix_form_score_exactly_as_the_frame_does(fitted):
    """The request path scores one row at a time: the same probabilities (calibrated or not)
    and SHAP contributions as the frame path, to the bit, missing values included."""
    scorer, test = fitted
    every_third = pl.int_range(pl.len()) % 3 == 0
    test = test.with_columns(income=pl.when(every_third).then(None).otherwise(pl.col("income")))
    uncalibrated = Scorer(scorer.feature_names, scorer.boosters, scorer.config)
    assert scorer.calibration and not uncalibrated.calibration
    matrix = to_matrix(test, scorer.feature_names)
    for s in (scorer, uncalibrated):
        probs = s.predict(test)
        contributions = {task: s.contributions(test, task) for task in s.tasks}
        for i in range(0, test.height, 37):
            p, c = s.score_rows(matrix[i : i + 1])
            for task in s.tasks:
                assert p[task].dtype == probs[task].dtype
                np.testing.assert_array_equal(p[task], probs[task][i : i + 1])
                np.testing.assert_array_equal(c[task], contributions[task][i : i + 1])


def test_boosters_trained_on_other_features_or_order_are_refused(fitted):
    scorer, _ = fitted
    with pytest.raises(ValueError, match="trained on features"):
        Scorer(list(reversed(scorer.feature_names)), scorer.boosters)


def test_a_missing_feature_or_reason_is_named():
    scorer = Scorer(feature_names=["a"], boosters={})
    with pytest.raises(ValueError, match="lacks features"):
        scorer.predict(pl.DataFrame({"b": [1.0]}))
    with pytest.raises(ValueError, match="unknown features"):
        ScorerConfig(monotone={"zz": 1}).params(["a"])
