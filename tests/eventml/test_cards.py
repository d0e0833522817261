"""The card world: deterministic, streamable, valid against its own pack, with fraud that
matures late and that only the order of events reveals."""

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from eventml.labels import build_decisions
from eventml.references import validate_reference
from eventml.validation import validate
from eventml.worlds.cards import PACK, WorldConfig, iter_days, references, simulate

WORLD = WorldConfig(n_users=400, n_days=90, seed=3)


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return simulate(WORLD)


def test_the_same_seed_makes_the_same_world_and_a_day_alone_equals_the_bulk_day(events):
    assert simulate(WORLD).equals(events)
    ((day, alone),) = list(iter_days(WORLD, range(41, 42)))
    feed = pl.concat([frame for _, frame in iter_days(WORLD)])
    assert alone.equals(feed.filter(pl.col("ts").dt.date() == alone["ts"].dt.date()[0]))
    assert not simulate(WorldConfig(n_users=400, n_days=90, seed=4)).equals(events)


def test_a_holders_region_comes_from_the_reference_table_as_of_each_event(events):
    """The feed carries no region or age band: the `holders` table does, from the card's issue
    on, and a move is a new row. Each event has the row valid at its own time."""
    ((_, feed),) = list(iter_days(WORLD, range(50, 51)))
    assert feed["region"].is_null().all() and feed["age_band"].is_null().all()
    holders = references(WORLD)["holders"]
    checked = validate_reference(holders, PACK.references[0], PACK)
    assert checked.rejects.height == 0 and checked.clean.height == holders.height
    movers = holders.group_by("entity_id").len().filter(pl.col("len") > 1)["entity_id"]
    assert movers.len() > 0
    for mover in movers:
        rows = holders.filter(pl.col("entity_id") == mover).sort("valid_from")
        own = events.filter(pl.col("entity_id") == mover)
        assert own["region"].null_count() == 0 and rows["region"].n_unique() > 1
        ends = [*rows["valid_from"][1:], own["ts"].max() + timedelta(1)]
        for start, end, region in zip(rows["valid_from"], ends, rows["region"], strict=True):
            held = own.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
            assert (held["region"] == region).all()


def test_every_event_is_valid_against_the_pack(events):
    checked = validate(events, PACK, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert checked.rejects.height == 0 and checked.clean.height == events.height
    assert events["event_id"].is_unique().all()


def test_fraud_is_confirmed_later_and_charged_back(events):
    payments = events.filter(pl.col("event_type") == "payment")
    assert 0.002 < payments["is_fraud"].mean() < 0.05
    # A chargeback for every reported fraud that is old enough to have one.
    old = payments.filter(
        (pl.col("is_fraud") == 1) & (pl.col("ts").dt.date() < pl.date(2025, 3, 15))
    )
    chargebacks = events.filter(pl.col("event_type") == "chargeback")
    assert chargebacks.height >= old.height > 0
    # Unconfirmed is unknown, not negative: the label is null until its horizon has passed.
    decisions = build_decisions(events, PACK, as_of=datetime(2025, 3, 25, tzinfo=UTC))
    recent = decisions.filter(pl.col("ts") > datetime(2025, 3, 12, tzinfo=UTC))
    assert recent["fraud"].null_count() == recent.height > 0


def test_the_planted_fraud_is_online_and_bounded_by_its_oracle(events):
    payments = events.filter(pl.col("event_type") == "payment")
    by_channel = dict(payments.group_by("channel").agg(pl.col("is_fraud").mean()).iter_rows())
    assert by_channel["card_not_present"] > 10 * by_channel["card_present"]
    oracle = roc_auc_score(payments["is_fraud"], payments["true_p_fraud"])
    assert 0.85 < oracle < 1.0
