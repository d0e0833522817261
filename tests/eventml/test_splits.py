"""Out-of-time splits: no decision in two splits, a gap of at least the longest horizon before
test, and unmatured rows never reach training."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from eventml.labels import build_decisions
from eventml.schema import TS_TYPE
from eventml.splits import (
    SplitConfig,
    check_splits,
    split_decisions,
    split_summary,
    training_rows,
    with_person_folds,
)
from eventml.worlds.lending import PACK as LENDING_PACK

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def decisions() -> pl.DataFrame:
    """A year of daily applications over 50 people, some approved, a few defaulting."""
    rng = np.random.default_rng(3)
    rows = []
    for day in range(365):
        for u in rng.choice(50, 3, replace=False):
            rows.append(
                (
                    f"u{u}",
                    T0 + timedelta(days=day, hours=10),
                    "application",
                    rng.choice(["approve", "decline"]),
                )
            )
            if rng.random() < 0.1:
                rows.append(
                    (
                        f"u{u}",
                        T0 + timedelta(days=day + int(rng.integers(20, 120))),
                        "delinquency_60",
                        None,
                    )
                )
    frame = pl.DataFrame(
        rows, schema=["entity_id", "ts", "event_type", "policy_decision"], orient="row"
    )
    frame = frame.with_columns(
        pl.col("ts").cast(TS_TYPE),
        pl.format("e{}", pl.int_range(pl.len())).alias("event_id"),
    ).filter(pl.col("ts") < T0 + timedelta(days=365))
    schema = LENDING_PACK.event_schema()
    events = frame.select(
        pl.col(c) if c in frame.columns else pl.lit(None, t).alias(c) for c, t in schema.items()
    )
    return build_decisions(events, LENDING_PACK)


def test_every_decision_is_in_exactly_one_split(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    assert s.height == decisions.height
    assert s["decision_id"].n_unique() == s.height
    assert set(s["split"].unique()) == {"train", "valid", "gap", "test"}


def test_train_and_valid_labels_mature_before_the_first_test_decision(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    first_test = s.filter(pl.col("split") == "test")["ts"].min()
    fit = s.filter(pl.col("split").is_in(["train", "valid"]))
    assert fit["default_90d_matures_at"].max() <= first_test
    assert fit["ts"].max() < s.filter(pl.col("split") == "gap")["ts"].min()
    gap = s.filter(pl.col("split") == "gap")
    assert first_test - gap["ts"].min() <= timedelta(days=90)
    assert first_test - fit["ts"].max() >= timedelta(days=90)


def test_splits_are_ordered_in_time(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    spans = (
        s.group_by("split")
        .agg(pl.col("ts").min().alias("lo"), pl.col("ts").max().alias("hi"))
        .sort("split")
    )
    lo, hi = spans["lo"].to_list(), spans["hi"].to_list()
    assert all(hi[i] < lo[i + 1] for i in range(3))


def test_unmatured_and_inapplicable_rows_never_reach_training(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    for split in ("train", "valid", "test"):
        rows = training_rows(s, "default_90d", split)
        assert rows["default_90d_matured"].all()
        assert rows["default_90d"].null_count() == 0
        assert (rows["policy_decision"] == "approve").all()
    # the test window reaches past the data's maturity: its newest rows are kept but unusable
    test = s.filter(pl.col("split") == "test")
    assert (~test["default_90d_matured"]).any()
    assert (
        training_rows(s, "default_90d", "test").height
        < test.filter(pl.col("policy_decision") == "approve").height
    )
    with pytest.raises(ValueError, match="gap is never used"):
        training_rows(s, "default_90d", "gap")


def test_fractions_size_the_test_and_valid_sets(decisions):
    s = split_decisions(
        decisions, LENDING_PACK, SplitConfig(valid_fraction=0.25, test_fraction=0.2)
    )
    matured = s.filter(pl.col("default_90d_matured"))
    share = matured.filter(pl.col("split") == "test").height / matured.height
    assert share == pytest.approx(0.2, abs=0.02)
    before_gap = s.filter(pl.col("split").is_in(["train", "valid"]))
    assert (before_gap["split"] == "valid").mean() == pytest.approx(0.25, abs=0.02)


def test_dates_set_the_cut_offs(decisions):
    cfg = SplitConfig(valid_start=T0 + timedelta(days=100), test_start=T0 + timedelta(days=250))
    s = split_decisions(decisions, LENDING_PACK, cfg)
    assert s.filter(pl.col("split") == "test")["ts"].min() >= T0 + timedelta(days=250)
    assert s.filter(pl.col("split") == "valid")["ts"].min() >= T0 + timedelta(days=100)
    assert s.filter(pl.col("split") == "valid")["ts"].max() < T0 + timedelta(days=160)


def test_a_gap_shorter_than_the_longest_horizon_is_refused(decisions):
    with pytest.raises(ValueError, match="shorter than the longest label horizon"):
        split_decisions(decisions, LENDING_PACK, SplitConfig(gap_days=30))


def test_people_are_dealt_into_folds_that_are_theirs_alone(decisions):
    folded = with_person_folds(split_decisions(decisions, LENDING_PACK))
    assert set(folded["fold"]) == {0, 1}
    per_person = folded.group_by("entity_id").agg(pl.col("fold").n_unique().alias("folds"))
    assert (per_person["folds"] == 1).all()  # nobody's rows teach two encoders
    # A person's fold is theirs alone: the same on a shuffled subset of the rows.
    subset = folded.sample(fraction=0.5, shuffle=True, seed=1)
    again = with_person_folds(subset.drop("fold")).join(
        subset.select("decision_id", pl.col("fold").alias("before")), on="decision_id"
    )
    assert (again["fold"] == again["before"]).all()
    # And the same in every process and release: BLAKE2b of the id, not Python's salted hash().
    folds = dict(folded.unique("entity_id").select("entity_id", "fold").iter_rows())
    assert [folds[u] for u in ("u0", "u1", "u2", "u5")] == [0, 0, 1, 1]
    # A salt deals the same people another way; fewer than two folds cross-fit nothing.
    salted = with_person_folds(folded.drop("fold"), salt="another dealing")
    assert 0 < (salted["fold"] != folded["fold"]).mean() < 1
    with pytest.raises(ValueError, match="folds must be at least 2"):
        with_person_folds(folded.drop("fold"), folds=1)


def test_summary_reports_rows_and_label_rates(decisions):
    summary = split_summary(split_decisions(decisions, LENDING_PACK), LENDING_PACK)
    assert sum(summary[s]["rows"] for s in summary) == decisions.height
    assert 0 < summary["train"]["default_90d_rate"] < 1
    assert summary["train"]["default_90d_rows"] > 0


def test_checks_pass_on_a_clean_split(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    outcomes = check_splits(
        s, LENDING_PACK, SplitConfig(label_rate_bands={"default_90d": (0.05, 0.95)})
    )
    assert [o.name for o in outcomes if not o.passed] == []


def test_checks_find_a_decision_in_two_splits(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    leaked = pl.concat(
        [
            s,
            s.filter(pl.col("split") == "test")
            .head(1)
            .with_columns(pl.lit("train").cast(s["split"].dtype).alias("split")),
        ]
    )
    failed = {o.name for o in check_splits(leaked, LENDING_PACK) if not o.passed}
    assert {"no_decision_in_two_splits", "horizon_gap"} <= failed


def test_checks_find_a_violated_gap(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    squeezed = s.with_columns(
        pl.when(pl.col("split") == "gap")
        .then(pl.lit("valid"))
        .otherwise(pl.col("split"))
        .cast(s["split"].dtype)
        .alias("split")
    )
    failed = {o.name: o for o in check_splits(squeezed, LENDING_PACK) if not o.passed}
    assert "horizon_gap" in failed and "default_90d" in failed["horizon_gap"].description


def test_checks_find_label_rates_outside_their_band(decisions):
    s = split_decisions(decisions, LENDING_PACK)
    failed = {
        o.name
        for o in check_splits(
            s, LENDING_PACK, SplitConfig(label_rate_bands={"default_90d": (0.5, 1.0)})
        )
        if not o.passed
    }
    assert failed == {"label_rates_in_band"}
