"""Drift and live performance: when the world has moved enough, and the model decayed enough, to
retrain — and when the evidence is too thin to say."""

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from eventml.drift import (
    DriftThresholds,
    band,
    drift_by_day,
    drift_plot,
    drift_table,
    drift_verdict,
    ks,
    monitored_features,
    psi,
)
from eventml.features import WINDOWED_KINDS
from eventml.performance import live_performance, performance_by_day, performance_verdict
from eventml.worlds.lending import PACK as LENDING_PACK

N = 5_000


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ------------------------------------------------------------------ PSI and KS


def test_identical_distributions_are_stable(rng):
    a, b = rng.normal(size=N), rng.normal(size=N)
    assert psi(a, a) == pytest.approx(0, abs=1e-12)
    assert psi(a, b) < 0.02
    assert band(psi(a, b)) == "stable"


def test_a_shifted_mean_is_drift_to_act_on(rng):
    a, b = rng.normal(size=N), rng.normal(loc=1.0, size=N)
    assert band(psi(a, b)) == "act"


def test_psi_grows_with_the_shift(rng):
    a = rng.normal(size=N)
    values = [psi(a, rng.normal(loc=shift, size=N)) for shift in (0.0, 0.2, 0.5, 1.0)]
    assert values == sorted(values)


def test_a_scale_change_at_the_same_mean_is_seen(rng):
    assert psi(rng.normal(size=N), rng.normal(scale=3, size=N)) > 0.25


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.0, "stable"),
        (0.099, "stable"),
        (0.1, "watch"),
        (0.25, "watch"),
        (0.2501, "act"),
        (3.0, "act"),
    ],
)
def test_conventional_bands(value, expected):
    assert band(value) == expected


def test_bands_follow_the_configured_thresholds():
    strict = DriftThresholds(watch=0.02, act=0.05)
    assert [band(v, strict) for v in (0.01, 0.03, 0.08)] == ["stable", "watch", "act"]
    with pytest.raises(ValueError, match="watch <= act"):
        DriftThresholds(watch=0.3, act=0.2)


def test_missing_values_are_a_bin_of_their_own(rng):
    a = rng.normal(size=N)
    same_rate = a.copy()
    same_rate[: N // 10] = np.nan
    other = rng.normal(size=N)
    other[: N // 10] = np.nan
    assert band(psi(same_rate, other)) == "stable"
    # The same values, but a third of them now arrive empty: that is drift.
    more_missing = a.copy()
    more_missing[: N // 3] = np.nan
    assert band(psi(a, more_missing)) == "act"
    assert psi(np.full(10, np.nan), np.full(20, np.nan)) == pytest.approx(0)
    assert np.isfinite(psi(np.full(10, np.nan), a))


def test_constant_columns_and_ties(rng):
    assert psi(np.ones(N), np.ones(N)) == pytest.approx(0)
    # A constant that moves lands outside the reference's only bin.
    assert band(psi(np.ones(N), np.full(N, 2.0))) == "act"
    assert band(psi(np.ones(N), np.zeros(N))) == "act"
    # A mostly-zero count column: tied quantiles collapse, same shares stay stable.
    counts = lambda: np.where(rng.random(N) < 0.9, 0, rng.poisson(3, N))  # noqa: E731
    assert band(psi(counts(), counts())) == "stable"


def test_categories_are_compared_share_by_share(rng):
    draw = lambda p: rng.choice(["web", "app", "store"], size=N, p=p)  # noqa: E731
    assert band(psi(draw([0.5, 0.3, 0.2]), draw([0.5, 0.3, 0.2]))) == "stable"
    assert band(psi(draw([0.5, 0.3, 0.2]), draw([0.1, 0.3, 0.6]))) == "act"
    new = np.concatenate([draw([0.5, 0.3, 0.2])[: N // 2], np.full(N // 2, "partner")])
    assert band(psi(draw([0.5, 0.3, 0.2]), new)) == "act"


def test_psi_refuses_an_empty_side():
    with pytest.raises(ValueError, match="rows on both sides"):
        psi(np.array([]), np.ones(3))


def test_ks_tells_same_from_shifted(rng):
    stat, p = ks(rng.normal(size=N), rng.normal(size=N))
    assert stat < 0.05 and p > 0.01
    stat, p = ks(rng.normal(size=N), rng.normal(loc=0.5, size=N))
    assert stat > 0.1 and p < 1e-6
    assert ks(np.array([np.nan]), np.ones(3)) != ks(np.ones(3), np.ones(3))


# ------------------------------------------------------------------ table, verdict, plot


def frames(rng, shifted: int, columns: int = 8):
    """`columns` numeric features, the first `shifted` of which move by one standard deviation."""
    ref = {f"x{i}": rng.normal(size=N) for i in range(columns)}
    cur = {f"x{i}": rng.normal(loc=1.0 if i < shifted else 0.0, size=N) for i in range(columns)}
    return pl.DataFrame(ref), pl.DataFrame(cur)


def test_drift_table_lists_every_column_worst_first(rng):
    ref, cur = frames(rng, shifted=2)
    ref = ref.with_columns(channel=pl.Series(rng.choice(["a", "b"], N)))
    cur = cur.with_columns(
        channel=pl.Series(rng.choice(["a", "b"], N)),
        x7=pl.when(pl.int_range(N) < N // 2).then(None).otherwise(pl.col("x7")),
    )
    table = drift_table(ref, cur, ref.columns)
    assert table.height == 9
    assert table["psi"].to_list() == sorted(table["psi"].to_list(), reverse=True)
    assert set(table["column"].head(3)) == {"x0", "x1", "x7"}
    assert set(table.filter(pl.col("band") == "act")["column"]) == {"x0", "x1", "x7"}
    x7 = table.row(by_predicate=pl.col("column") == "x7", named=True)
    assert x7["null_rate_reference"] == 0 and x7["null_rate_current"] == pytest.approx(0.5)
    channel = table.row(by_predicate=pl.col("column") == "channel", named=True)
    assert channel["band"] == "stable" and channel["ks_statistic"] is None


def test_drift_table_names_the_missing_columns(rng):
    ref, cur = frames(rng, shifted=0)
    with pytest.raises(ValueError, match="nope"):
        drift_table(ref, cur, ["x0", "nope"])


@pytest.mark.parametrize(
    "shifted, score_psi, fires",
    [
        (0, 0.01, False),  # nothing moved
        (0, None, False),  # no score yet, nothing moved
        (0, 0.30, True),  # the score moved
        (2, 0.01, False),  # two features past 0.25: worth a look, not a retrain
        (3, 0.01, True),  # three features past 0.25
        (3, None, True),
    ],
)
def test_the_drift_verdict_fires_on_the_score_or_on_enough_features(rng, shifted, score_psi, fires):
    table = drift_table(*frames(rng, shifted), [f"x{i}" for i in range(8)])
    should_retrain, reasons, figures = drift_verdict(table, score_psi, DriftThresholds())
    assert should_retrain is fires
    assert len(reasons) >= 1
    assert any("no retrain" in r for r in reasons) is not fires
    assert figures["features_act"] == shifted and figures["features"] == 8
    if shifted:
        assert figures["worst_feature"] in {f"x{i}" for i in range(shifted)}


def test_the_feature_count_to_act_is_configurable(rng):
    table = drift_table(*frames(rng, 1), [f"x{i}" for i in range(8)])
    assert drift_verdict(table, None, DriftThresholds(features_to_act=1))[0]
    assert not drift_verdict(table, 0.2, DriftThresholds())[0]
    assert drift_verdict(table, 0.2, DriftThresholds(score_psi_act=0.15))[0]


def test_each_task_score_is_judged_and_named(rng):
    table = drift_table(*frames(rng, 0), [f"x{i}" for i in range(8)])
    fires, reasons, figures = drift_verdict(table, {"default_90d": 0.05, "fraud_60d": 0.4})
    assert fires and reasons == ["fraud_60d score PSI 0.400 > 0.25"]
    assert figures["score_psi"] == 0.4
    assert figures["score_psi_by_task"] == {"default_90d": 0.05, "fraud_60d": 0.4}


def daily_rows(rng, first: date, days: int, per_day: int, shift_from: date):
    """`per_day` decisions a day with features x0..x3 and a served p_default_90d; from
    `shift_from` on, x0 and the score move by one standard deviation."""
    frames = []
    for i in range(days):
        day = first + timedelta(days=i)
        loc = 1.0 if day >= shift_from else 0.0
        frames.append(pl.DataFrame({
            "day": [day] * per_day, "x0": rng.normal(loc=loc, size=per_day),
            **{f"x{j}": rng.normal(size=per_day) for j in (1, 2, 3)},
            f"p_{TASK}": rng.normal(loc=loc, size=per_day),
        }))  # fmt: skip
    return pl.concat(frames)


def test_drift_is_judged_day_by_day_over_a_trailing_window(rng):
    first, shift = date(2025, 6, 1), date(2025, 6, 15)
    rows = daily_rows(rng, first, days=20, per_day=200, shift_from=shift)
    reference = daily_rows(rng, first, days=5, per_day=400, shift_from=date(2030, 1, 1))
    days = [first + timedelta(days=i) for i in range(20)]
    skipped = []
    table, newest = drift_by_day(
        reference, rows, rows, days, columns=["x0", "x1", "x2", "x3"], monitored={"x0", "x1"},
        tasks=[TASK], window_days=7, min_rows=300, log=skipped.append,
    )  # fmt: skip
    # The first day's window holds 200 decisions (< 300): noise, skipped and said so.
    assert len(skipped) == 1 and skipped[0].startswith("2025-06-01")
    assert table["day"].n_unique() == 19
    assert set(table.filter(pl.col("monitored"))["column"]) == {"x0", "x1", f"p_{TASK}"}
    score = table.filter(pl.col("column") == f"p_{TASK}").sort("day")["psi"].to_list()
    assert score[12] < 0.1 < score[-1]  # 2025-06-14 is all before the shift; the last, mostly after
    assert newest.day == days[-1] and newest.decisions == newest.scored == 7 * 200
    assert newest.score_psi[TASK] > 0.25 and newest.table["column"][0] == "x0"


def test_performance_is_judged_as_of_the_end_of_each_day(rng):
    decisions, scores = world(rng, 3_000, LIVE, 80, good=False)
    # 80 days of decisions mature over days 90-170 after going live: judge the middle and the end.
    days = [(LIVE + timedelta(days=d)).date() for d in (100, 170)]
    table, retrain, reasons = performance_by_day(
        decisions, scores, [TASK], {TASK: 0.8}, LIVE, days, min_labels=1000
    )
    assert table.height == 2 and table["reference_auc"].to_list() == [0.8, 0.8]
    middle, end = table.sort("day").iter_rows(named=True)
    assert middle["n"] < 1000 and not middle["retrain"]  # not judged yet: too few labels
    assert end["n"] == 3_000 and end["retrain"]
    assert retrain and "live AUC" in reasons[0]  # the verdict is the newest day's


def test_without_a_reference_auc_performance_is_reported_not_judged(rng):
    decisions, scores = world(rng, 3_000, LIVE, 80, good=False)
    table, retrain, reasons = performance_by_day(
        decisions, scores, [TASK], {TASK: None}, LIVE, [AS_OF.date()]
    )
    assert table["n"].item() == 3_000 and not retrain and "no test AUC" in reasons[0]


def test_features_that_grow_with_every_users_age_are_not_monitored():
    feature_set = LENDING_PACK.feature_set()
    kinds = {f.name: (f.kind, f.window) for f in feature_set.features}
    monitored = monitored_features(feature_set)
    assert "n_application_30d" in monitored and "income_band_code" in monitored
    assert "decision_amount" in monitored
    for name in ("n_events_all", "days_since_signup", "n_prior_same_device_id"):
        assert name in kinds and name not in monitored
    assert all(kinds[n][1] != "all" or kinds[n][0] not in WINDOWED_KINDS for n in monitored)


def test_drift_plot_is_a_png(rng):
    table = drift_table(*frames(rng, 2), [f"x{i}" for i in range(8)])
    assert drift_plot(table, top=5).startswith(b"\x89PNG")


# ------------------------------------------------------------------ live performance

LIVE = datetime(2025, 6, 1, tzinfo=UTC)
AS_OF = datetime(2025, 12, 1, tzinfo=UTC)
TASK = "default_90d"


def world(rng, n: int, start: datetime, days: int, good: bool = True):
    """Decisions spread over `days` from `start`, scored by a model that is informative (`good`)
    or exactly backwards; labels mature 90 days after the decision."""
    ts = [start + timedelta(days=float(d)) for d in rng.uniform(0, days, n)]
    p = rng.uniform(0.01, 0.6, n)
    y = (rng.random(n) < p).astype(np.int8)
    matures_at = [t + timedelta(days=90) for t in ts]
    decisions = pl.DataFrame({
        "decision_id": [f"{start:%m%d}-{i}" for i in range(n)], "ts": ts, TASK: y,
        f"{TASK}_matures_at": matures_at, f"{TASK}_matured": [m <= AS_OF for m in matures_at],
    })  # fmt: skip
    scores = decisions.select("decision_id", pl.Series(f"p_{TASK}", p if good else 1 - p))
    return decisions, scores


def test_live_performance_counts_only_matured_decisions_since_going_live(rng):
    # Before going live: a backwards model's scores, which must not count.
    before, before_scores = world(rng, 2_000, LIVE - timedelta(days=120), 100, good=False)
    # Live and matured by AS_OF (decided within the first 90 days after LIVE).
    matured, matured_scores = world(rng, 3_000, LIVE, 80)
    # Live, not matured by AS_OF — labels filled in as if known, and backwards: must stay pending.
    recent, recent_scores = world(rng, 1_000, AS_OF - timedelta(days=60), 59, good=False)
    decisions = pl.concat([before, matured, recent])
    scores = pl.concat([before_scores, matured_scores, recent_scores])
    live = live_performance(decisions, scores, TASK, LIVE, AS_OF)
    assert live["decisions"] == 4_000
    assert live["n"] == 3_000 and live["pending"] == 1_000 and live["unscored"] == 0
    assert live["auc"] > 0.7
    assert live["mean_predicted"] == pytest.approx(live["observed_rate"], abs=0.03)
    assert live["ece"] < 0.05


def test_maturity_is_judged_at_as_of_not_when_the_table_was_built(rng):
    decisions, scores = world(rng, 1_000, LIVE, 80)
    earlier = LIVE + timedelta(days=120)  # only decisions before LIVE + 30 days have matured
    live = live_performance(decisions, scores, TASK, LIVE, earlier)
    expected = decisions.filter(pl.col(f"{TASK}_matures_at") <= earlier).height
    assert 0 < live["n"] == expected < live["decisions"]
    assert live["pending"] == live["decisions"] - expected


def test_unscored_and_inapplicable_decisions_are_counted_not_judged(rng):
    decisions, scores = world(rng, 1_000, LIVE, 80)
    decisions = decisions.with_columns(
        pl.when(pl.int_range(pl.len()) < 100).then(None).otherwise(pl.col(TASK)).alias(TASK)
    )
    live = live_performance(decisions, scores.tail(800), TASK, LIVE, AS_OF)
    assert live["unscored"] == 200
    assert live["not_applicable"] == 0  # the 100 without a label are among the unscored
    assert live["n"] == 800


def test_live_performance_names_missing_columns(rng):
    decisions, scores = world(rng, 10, LIVE, 10)
    with pytest.raises(ValueError, match="p_fraud"):
        live_performance(decisions.rename({TASK: "fraud", f"{TASK}_matured": "fraud_matured"}),
                         scores, "fraud", LIVE, AS_OF)  # fmt: skip


def test_a_decayed_model_on_enough_labels_triggers_a_retrain(rng):
    decisions, scores = world(rng, 3_000, LIVE, 80, good=False)
    live = live_performance(decisions, scores, TASK, LIVE, AS_OF)
    should_retrain, reasons = performance_verdict(live, reference_auc=0.80, max_auc_drop=0.05)
    assert should_retrain and "live AUC" in reasons[0]


def test_a_model_that_holds_up_is_kept(rng):
    decisions, scores = world(rng, 3_000, LIVE, 80)
    live = live_performance(decisions, scores, TASK, LIVE, AS_OF)
    should_retrain, reasons = performance_verdict(live, reference_auc=live["auc"] + 0.01)
    assert not should_retrain and reasons[0].startswith("no retrain")


@pytest.mark.parametrize("n, min_labels, min_positives", [(200, 1000, 50), (3_000, 1000, 5000)])
def test_tiny_samples_are_not_judged_even_when_they_look_terrible(
    rng, n, min_labels, min_positives
):
    decisions, scores = world(rng, n, LIVE, 80, good=False)
    live = live_performance(decisions, scores, TASK, LIVE, AS_OF)
    assert live["auc"] < 0.5
    should_retrain, reasons = performance_verdict(
        live, 0.8, 0.05, min_labels=min_labels, min_positives=min_positives
    )
    assert not should_retrain and reasons[0].startswith("not judging")


def test_nothing_matured_yet_is_reported_as_pending(rng):
    decisions, scores = world(rng, 500, AS_OF - timedelta(days=30), 29)
    live = live_performance(decisions, scores, TASK, AS_OF - timedelta(days=30), AS_OF)
    assert live["n"] == 0 and live["pending"] == 500 and np.isnan(live["auc"])
    assert not performance_verdict(live, 0.8)[0]


def test_a_binary_column_compares_its_two_shares(rng):
    assert band(psi(rng.random(N) < 0.1, rng.random(N) < 0.1)) == "stable"
    assert band(psi(rng.random(N) < 0.1, rng.random(N) < 0.5)) == "act"
