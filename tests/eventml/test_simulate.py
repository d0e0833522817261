"""The synthetic lending world: deterministic, streamable, valid, and true to its own oracle."""

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from eventml.validation import validate
from eventml.worlds.lending import (
    PACK as LENDING_PACK,
)
from eventml.worlds.lending import (
    WorldConfig,
    date_of,
    day_of,
    hidden_users,
    iter_days,
    simulate,
    simulate_day,
)

# Small enough to run in seconds; more fraudsters than the default world so their patterns and
# labels have a sample to be judged on. The shift comes once the first months have filled the
# books (default rates climb from an empty start), and leaves 30 matured days after it.
WORLD = WorldConfig(
    n_users=3000, n_days=250, seed=3, shift_day=130, bust_out_rate=0.03, stolen_identity_rate=0.02
)


def world_end(cfg: WorldConfig) -> datetime:
    return datetime.combine(date_of(cfg, cfg.n_days), datetime.min.time(), tzinfo=UTC)


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return simulate(WORLD)


@pytest.fixture(scope="module")
def truth() -> pl.DataFrame:
    return hidden_users(WORLD)


def with_label(events: pl.DataFrame, cfg: WorldConfig, name: str) -> pl.DataFrame:
    """Matured applications with the label computed as the spec defines it: 1 if the entity has
    an event of the label's type in (ts, ts + horizon]; only where `applies_when` holds."""
    label = LENDING_PACK.label(name)
    horizon = pl.duration(days=label.horizon_days)
    apps = events.filter(
        pl.col("event_type") == "application", pl.col("ts") + horizon <= world_end(cfg)
    )
    for col, value in label.applies_when.items():
        apps = apps.filter(pl.col(col) == value)
    outcomes = events.filter(pl.col("event_type") == label.event_type).select(
        "entity_id", pl.col("ts").alias("outcome_ts")
    )
    hits = (
        apps.select("event_id", "entity_id", "ts")
        .join(outcomes, on="entity_id")
        .filter(pl.col("outcome_ts") > pl.col("ts"), pl.col("outcome_ts") <= pl.col("ts") + horizon)
        .select("event_id")
        .unique()
    )
    return apps.with_columns(
        pl.col("event_id").is_in(hits["event_id"].implode()).cast(pl.Int8).alias("y")
    )


def day_col() -> pl.Expr:
    return (pl.col("ts").dt.date() - date_of(WORLD, 0)).dt.total_days()


# ------------------------------------------------------------------ determinism and streaming


def test_same_seed_gives_the_same_world_and_another_seed_another():
    small = WorldConfig(n_users=300, n_days=40)
    assert simulate(small).equals(simulate(small))
    assert not simulate(small).equals(simulate(replace(small, seed=small.seed + 1)))


def test_day_by_day_equals_the_bulk_run(events):
    streamed = list(iter_days(WORLD))
    assert [day for day, _ in streamed] == list(range(WORLD.n_days))
    assert pl.concat([frame for _, frame in streamed]).equals(events)
    assert simulate(WORLD, range(120, 130)).equals(events.filter(day_col().is_between(120, 129)))
    assert simulate_day(WORLD, 150).equals(events.filter(day_col() == 150))


def test_an_empty_range_gives_no_events_and_a_range_outside_the_world_is_refused():
    assert simulate(WORLD, range(5, 5)).schema == LENDING_PACK.event_schema()
    with pytest.raises(ValueError, match="inside"):
        simulate(WORLD, range(240, 260))


def test_day_helpers_round_trip():
    assert date_of(WORLD, 0) == date(2025, 1, 1)
    assert day_of(WORLD, date_of(WORLD, 37)) == 37
    assert day_of(WORLD, datetime(2025, 1, 2, 23, 59, tzinfo=UTC)) == 1
    assert day_of(WORLD, "2025-02-01") == 31


# ------------------------------------------------------------------ the contract


def test_events_meet_the_contract_exactly(events):
    assert events.schema == LENDING_PACK.event_schema()
    checked = validate(events, LENDING_PACK, now=world_end(WORLD))
    assert checked.rejects.height == 0, checked.reject_counts()
    assert checked.clean.height == events.height
    assert events["event_id"].n_unique() == events.height
    assert events.equals(events.sort("ts", "event_id"))
    # Each event lies on the day its id names.
    assert (
        events["event_id"].str.slice(1, 4).cast(pl.Int64) == events.select(day_col()).to_series()
    ).all()


def test_each_person_starts_with_a_signup_that_carries_the_static_attributes(events):
    first = events.group_by("entity_id").agg(pl.col("event_type").first(), pl.col("region").first())
    assert (first["event_type"] == "signup").all() and first["region"].null_count() == 0
    others = events.filter(pl.col("event_type") != "signup")
    assert (
        others.select(pl.col("region", "age_band", "income_band").null_count()).row(0)
        == (others.height,) * 3
    )


def test_attributes_appear_on_the_events_they_belong_to(events):
    apps = events.filter(pl.col("event_type") == "application")
    filled = [
        "amount",
        "channel",
        "device_id",
        "merchant_category",
        "policy_decision",
        "term_months",
        "true_p_default",
        "true_p_fraud",
    ]
    assert apps.select(pl.sum_horizontal(pl.col(filled).null_count())).item() == 0
    assert set(apps["term_months"].unique()) <= {1.0, 3.0, 6.0, 12.0}
    assert (
        events.filter(pl.col("event_type") != "application")["true_p_default"].null_count()
        == events.height - apps.height
    )
    late = events.filter(pl.col("event_type") == "payment_late")["days_late"]
    assert late.min() >= 1 and late.max() <= 29
    assert (
        events.filter(pl.col("event_type") == "profile_change")["profile_field"].null_count() == 0
    )


def test_the_world_before_its_shift_has_believable_volumes_and_rates(events):
    calm = events.filter(day_col() < WORLD.shift_day)
    per_user_year = calm.height / WORLD.n_users / (WORLD.shift_day / 365)
    assert 80 < per_user_year < 250
    apps = calm.filter(pl.col("event_type") == "application")
    assert 0.55 < (apps["policy_decision"] == "approve").mean() < 0.85
    labelled = with_label(events, WORLD, "default_90d").filter(day_col() < WORLD.shift_day)
    assert 0.02 < labelled["y"].mean() < 0.10


# ------------------------------------------------------------------ planted patterns


def test_bust_out_is_profile_change_then_new_device_then_a_run_of_large_applications(events, truth):
    bust_outs = truth.filter(
        pl.col("fraud_type") == "bust_out", pl.col("fraud_confirm_day") < WORLD.n_days
    )
    assert bust_outs.height >= 10
    median_amount = events.filter(pl.col("event_type") == "application")["amount"].median()
    for entity_id, start in bust_outs.select("entity_id", "fraud_start_day").iter_rows():
        history = events.filter(pl.col("entity_id") == entity_id).with_columns(
            day_col().alias("day")
        )
        confirmed = history.filter(pl.col("event_type") == "fraud_confirmed")["ts"].item()
        device = history.filter(pl.col("event_type") == "device_change", pl.col("day") < start)[-1]
        profile = history.filter(
            pl.col("event_type") == "profile_change", pl.col("ts") < device["ts"].item()
        )[-1]
        run = history.filter(
            pl.col("event_type") == "application",
            pl.col("ts").is_between(device["ts"].item(), device["ts"].item() + timedelta(days=5)),
        )
        assert device["ts"].item() - profile["ts"].item() <= timedelta(days=3)
        assert run.height >= 2 and run["ts"].max() < confirmed
        assert run["amount"].median() > 2 * median_amount
        # The run comes from the new device, never seen before the change.
        earlier_devices = history.filter(pl.col("ts") < device["ts"].item())["device_id"]
        assert (run["device_id"] == device["device_id"].item()).all()
        assert device["device_id"].item() not in earlier_devices.to_list()
        # ... after months of ordinary use.
        assert (device["ts"].item() - history["ts"].min()).days >= 60


def test_a_stolen_identity_switches_device_within_days_of_signup_then_applies(events, truth):
    stolen = truth.filter(
        pl.col("fraud_type") == "stolen_identity", pl.col("fraud_confirm_day") < WORLD.n_days
    )
    assert stolen.height >= 10
    for entity_id in stolen["entity_id"]:
        history = events.filter(pl.col("entity_id") == entity_id)
        signup = history.filter(pl.col("event_type") == "signup")["ts"].item()
        device = history.filter(pl.col("event_type") == "device_change")["ts"].min()
        apps = history.filter(pl.col("event_type") == "application")
        assert timedelta(0) < device - signup <= timedelta(days=3)
        assert apps.height >= 1 and apps["ts"].min() > device
        assert history.filter(pl.col("event_type") == "fraud_confirmed").height == 1


def test_only_fraudsters_are_confirmed_as_fraud_and_their_accounts_go_quiet(events, truth):
    confirmed = events.filter(pl.col("event_type") == "fraud_confirmed")
    kinds = confirmed.join(truth, on="entity_id")["fraud_type"]
    assert kinds.len() > 0 and (kinds != "none").all()
    last = events.group_by("entity_id").agg(pl.col("ts").max().alias("last"))
    after = confirmed.join(last, on="entity_id")
    assert (after["last"] == after["ts"]).all()


def test_stress_shows_as_lateness_before_default(events):
    """Defaulters' payments were already slipping before the application that defaulted."""
    labelled = with_label(events, WORLD, "default_90d")
    payments = events.filter(
        pl.col("event_type").is_in(["payment_on_time", "payment_late", "payment_missed"])
    )
    prior = (
        labelled.select("event_id", "entity_id", "ts", "y")
        .join(
            payments.select("entity_id", pl.col("ts").alias("pay_ts"), "event_type"), on="entity_id"
        )
        .filter(
            pl.col("pay_ts") < pl.col("ts"), pl.col("pay_ts") >= pl.col("ts") - pl.duration(days=60)
        )
        .group_by("y")
        .agg((pl.col("event_type") != "payment_on_time").mean().alias("late_share"))
    )
    share = dict(zip(prior["y"], prior["late_share"], strict=True))
    assert share[1] > 1.5 * share[0]


# ------------------------------------------------------------------ the oracle


def assert_calibrated(labelled: pl.DataFrame, p: str) -> None:
    """Mean predicted vs observed, overall and per quantile bin, within 3.5 standard errors.
    Errors are clustered by entity, since one person's labels share their outcome events."""

    def check(rows: pl.DataFrame, what: str) -> None:
        resid = (
            rows.group_by("entity_id")
            .agg((pl.col("y") - pl.col(p)).sum().alias("r"))["r"]
            .to_numpy()
        )
        mean_resid, se = resid.sum() / rows.height, np.sqrt((resid**2).sum()) / rows.height
        assert abs(mean_resid) <= 3.5 * se + 1e-3, (
            f"{what}: observed - predicted = {mean_resid:.4f}, se {se:.4f}"
        )

    check(labelled, "overall")
    uncertain = labelled.filter(pl.col(p).is_between(0, 1, closed="none"))
    ranks = uncertain[p].rank("ordinal").to_numpy()
    for b in range(5):
        check(uncertain.filter(pl.Series((ranks - 1) * 5 // uncertain.height == b)), f"bin {b}")
    # Where the simulator was certain, the world agrees.
    assert (labelled.filter(pl.col(p) == 1)["y"] == 1).all()
    assert (labelled.filter(pl.col(p) == 0)["y"] == 0).all()


def test_true_p_default_is_calibrated_against_the_labels_the_world_produced(events):
    labelled = with_label(events, WORLD, "default_90d")
    assert labelled["y"].sum() > 100
    assert_calibrated(labelled, "true_p_default")


def test_true_p_fraud_is_calibrated_against_the_labels_the_world_produced(events):
    labelled = with_label(events, WORLD, "fraud_60d")
    assert labelled["y"].sum() > 100
    assert_calibrated(labelled, "true_p_fraud")


def test_default_is_learnable_from_history_but_not_beyond_the_oracle(events):
    labelled = with_label(events, WORLD, "default_90d")
    oracle = roc_auc_score(labelled["y"], labelled["true_p_default"])
    assert 0.75 < oracle < 0.95
    # A window count (late or missed payments in the 60 days before) sees part of the signal.
    bad = events.filter(pl.col("event_type").is_in(["payment_late", "payment_missed"]))
    counts = (
        labelled.select("event_id", "entity_id", "ts")
        .join(bad.select("entity_id", pl.col("ts").alias("bad_ts")), on="entity_id", how="left")
        .group_by("event_id")
        .agg(
            (
                (pl.col("bad_ts") < pl.col("ts"))
                & (pl.col("bad_ts") >= pl.col("ts") - pl.duration(days=60))
            )
            .sum()
            .alias("n_bad")
        )
    )
    feature = labelled.join(counts, on="event_id")
    window = roc_auc_score(feature["y"], feature["n_bad"])
    assert 0.55 < window < oracle


# ------------------------------------------------------------------ regime shift


def test_the_regime_shift_raises_defaults_after_its_day_and_strength_zero_changes_nothing(events):
    calm = simulate(replace(WORLD, shift_strength=0.0))
    assert calm.equals(simulate(replace(WORLD, shift_day=None)))
    # Identical up to the shift; different after it.
    assert calm.filter(day_col() < WORLD.shift_day).equals(
        events.filter(day_col() < WORLD.shift_day)
    )

    def before_after(world_events: pl.DataFrame) -> tuple[dict, dict]:
        """Default rate (observed labels, and expected = mean true p) in the 60 days before the
        shift and the matured days after it."""
        labelled = with_label(world_events, WORLD, "default_90d").with_columns(
            day_col().alias("day")
        )
        periods = (
            pl.col("day").is_between(WORLD.shift_day - 60, WORLD.shift_day - 1),
            pl.col("day") >= WORLD.shift_day,
        )
        return tuple(
            labelled.filter(period)
            .select(observed=pl.col("y").mean(), expected=pl.col("true_p_default").mean())
            .row(0, named=True)
            for period in periods
        )

    calm_before, calm_after = before_after(calm)
    shifted_before, shifted_after = before_after(events)
    assert shifted_before == calm_before
    assert shifted_after["observed"] > 1.4 * calm_after["observed"]
    # Within one world: the expected rate (calibrated against labels above) jumps only with a shift.
    assert shifted_after["expected"] > 1.4 * shifted_before["expected"]
    assert 0.7 < calm_after["expected"] / calm_before["expected"] < 1.3
    assert shifted_after["observed"] > 1.2 * shifted_before["observed"]


def test_hidden_truth_has_one_row_per_person_with_the_configured_fraud_mix(events, truth):
    assert truth.height == WORLD.n_users and truth["entity_id"].n_unique() == WORLD.n_users
    assert set(events["entity_id"].unique()) <= set(truth["entity_id"])
    shares = truth["fraud_type"].value_counts(normalize=True)
    share = dict(zip(shares["fraud_type"], shares["proportion"], strict=True))
    assert share["bust_out"] == pytest.approx(WORLD.bust_out_rate, abs=0.01)
    assert share["stolen_identity"] == pytest.approx(WORLD.stolen_identity_rate, abs=0.01)
    # Signups: a large first cohort, the rest through the year.
    assert (truth["signup_day"] < WORLD.initial_cohort_days).mean() > WORLD.initial_cohort
