"""The dataset pack: one file per source that every stage reads, checked when it loads, and
whose labels never reach an input."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import returns_world
import yaml

from eventml.pack import DatasetPack
from eventml.schema import SpecError
from eventml.sequences import SequenceSpec, build_sequences
from eventml.traffic import score_requests
from eventml.validation import validate
from eventml.worlds import WORLDS, cards, lending, load_pack

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def returns_pack() -> DatasetPack:
    return DatasetPack.from_dict(yaml.safe_load(returns_world.PACK))


def returns_events() -> pl.DataFrame:
    checked = validate(returns_world.events(n_customers=80, n_days=90), returns_pack(), NOW)
    assert checked.rejects.height == 0
    return checked.clean


# Every pack the project knows: the built-in worlds' and a user's own (tests/returns_world.py).
PACKS = {
    "lending": (lambda: lending.PACK, lambda: lending.simulate(lending.WorldConfig(n_users=150, n_days=120))),
    "cards": (lambda: cards.PACK, lambda: cards.simulate(cards.WorldConfig(n_users=150, n_days=60))),
    "returns": (returns_pack, returns_events),
}  # fmt: skip


def inputs(pack: DatasetPack, events: pl.DataFrame, drop: list[str] = ()) -> dict:
    """Everything a model reads (decision features but `drop`, encoder arrays and request
    bodies)."""
    decisions = events.filter(pl.col("event_type").is_in(pack.decision_event_types)).rename(
        {"event_id": "decision_id"}
    )
    coding = SequenceSpec.fit(pack, events)
    return {
        "features": pack.compute_features(events, decisions).drop(drop),
        "sequences": build_sequences(events, decisions, coding, max_len=16),
        "requests": score_requests(decisions, pack),
    }


def test_every_built_in_world_has_a_test_here():
    assert set(WORLDS) <= set(PACKS)


@pytest.mark.parametrize("name", PACKS)
def test_permuting_the_label_and_oracle_columns_changes_no_input_byte(name):
    """Except the keyed families' counts of matured labels (a terminal's known fraud), which
    read labels once matured by design: the next test holds them to that."""
    make_pack, make_events = PACKS[name]
    pack, events = make_pack(), make_events()
    hidden = [*pack.label_columns, *pack.oracle_columns]
    assert hidden, "a pack without label or oracle columns proves nothing here"
    permuted = events.with_columns(pl.col(c).shuffle(seed=1) for c in hidden)
    assert not permuted.select(hidden).equals(events.select(hidden))
    matured = [f.name for f in pack.feature_set().of_kind("key_positives", "key_rate")]
    assert_same_inputs(inputs(pack, events, drop=matured), inputs(pack, permuted, drop=matured))


def test_a_label_reaches_a_keyed_feature_only_once_it_has_matured():
    """Permuting the labels of the last horizon's payments changes nothing the last day's
    decisions read: none of those labels was known by then."""
    pack, events = cards.PACK, PACKS["cards"][1]()
    assert pack.feature_set().of_kind("key_rate"), "the card pack rates its terminals' fraud"
    last = events["ts"].max().date()
    horizon = max(x.horizon_days for x in pack.labels)
    recent = pl.col("ts") >= datetime.combine(last, datetime.min.time(), UTC) - timedelta(horizon)
    permuted = events.with_columns(
        pl.when(recent).then(pl.col(c).shuffle(seed=1)).otherwise(pl.col(c)).alias(c)
        for c in pack.label_columns
    )
    assert not permuted.equals(events)
    on_last_day = pl.col("ts").dt.date() == last
    decisions = events.filter(on_last_day, pl.col("event_type") == "payment")
    decisions = decisions.rename({"event_id": "decision_id"})
    before = pack.compute_features(events, decisions)
    assert before["terminal_id_n_fraud_30d"].sum() > 0, "some fraud had matured by then"
    assert before.equals(pack.compute_features(permuted, decisions))


def test_the_lending_pack_is_a_file_like_any_users():
    assert load_pack("lending") == DatasetPack.from_yaml("eventml/worlds/lending/pack.yaml")
    assert set(lending.PACK.policy) == {x.name for x in lending.PACK.labels}


def base() -> dict:
    return yaml.safe_load(returns_world.PACK)


@pytest.mark.parametrize(
    "change, names",
    [
        ({"monotone": {"n_refund_all": 1}}, "monotone: ['n_refund_all']"),
        ({"segments": [{"name": "s", "feature": "nope", "breaks": [1], "labels": ["a", "b"]}]},
         "segments.s.feature: 'nope'"),
        ({"segments": [{"name": "s", "feature": "n_order_all", "breaks": [1], "labels": ["a"]}]},
         "give as many labels"),
        ({"policy": {"returned_14d": 0.5}}, "policy: no decline threshold for ['disputed']"),
        ({"policy": {"returned_14d": 0.5, "disputed": 0.5, "churn": 0.5}}, "policy: ['churn']"),
        ({"promotion": {"task": "churn"}}, "promotion.task: 'churn'"),
        ({"features": {"decision_columns": ["was_disputed"]}},
         "features.decision_columns: 'was_disputed' is not an input column"),
        ({"features": {"statistics": [{"column": "was_disputed", "event_types": ["order"]}]}},
         "features.statistics[0].column: 'was_disputed'"),
        ({"oracle": {"churn": "p_churn"}}, "oracle: ['churn'] are not labels"),
        ({"partitions": {"start": "2024-12-01", "days": 10}}, "partitions.start"),
        ({"identifiers": ["basket_items"]}, "identifiers: ['basket_items'] are not categorical"),
        ({"identifiers": ["shop"]}, "identifiers: ['shop'] also have declared categories"),
        ({"excluded": ["coupon"]}, "excluded: ['coupon'] are not declared attribute columns"),
        ({"excluded": ["shop"], "references": []}, "features.distinct_columns: 'shop' is not an input"),
        ({"excluded": ["shop"]}, "references.shops.key: 'shop' is not entity_id or a categorical input"),
    ],
)  # fmt: skip
def test_a_pack_that_cannot_work_names_the_key_and_the_fix(change, names):
    with pytest.raises(SpecError, match="returns_pack.yaml is invalid") as raised:
        DatasetPack.from_dict({**base(), **change}, origin="dataset pack returns_pack.yaml")
    assert names in str(raised.value)


def assert_same_inputs(before: dict, after: dict) -> None:
    assert before["features"].equals(after["features"])
    assert before["requests"] == after["requests"]
    assert before["sequences"].keys() == after["sequences"].keys()
    for key, array in before["sequences"].items():
        np.testing.assert_array_equal(array, after["sequences"][key], err_msg=key)


def test_an_excluded_column_is_stored_but_never_an_input():
    raw = base()
    raw["categorical"] = ["shop", "agent_note"]
    raw["excluded"] = ["agent_note"]
    pack = DatasetPack.from_dict(raw)
    frame = returns_world.events(n_customers=60, n_days=60)
    noted = frame.with_columns(
        ("note " + pl.int_range(pl.len()).cast(pl.String)).alias("agent_note")
    )
    events = validate(noted, pack, NOW).clean
    assert events["agent_note"].null_count() == 0  # kept in the table
    permuted = events.with_columns(pl.col("agent_note").shuffle(seed=1))
    before, after = inputs(pack, events), inputs(pack, permuted)
    assert_same_inputs(before, after)
    assert all("agent_note" not in body for body in before["requests"])


def test_identifiers_are_coded_by_first_appearance_whatever_their_count():
    coding = {c.name: c for c in SequenceSpec.fit(cards.PACK, PACKS["cards"][1]()).categorical}
    assert coding["terminal_id"].first_seen and coding["merchant_id"].first_seen
    assert coding["channel"].vocabulary == ("card_present", "card_not_present")


def test_a_constant_fills_a_column_the_source_does_not_have():
    pack = DatasetPack.from_dict({
        "name": "cards", "source_start": "2025-01-01", "event_types": ["payment"],
        "decision_event_types": ["payment"], "constants": {"event_type": "payment"},
    })  # fmt: skip
    raw = pl.DataFrame({"entity_id": ["c1"], "event_id": ["p1"], "ts": ["2025-02-01T10:00:00Z"],
                        "amount": ["12.5"]})  # fmt: skip
    checked = validate(raw, pack, NOW)
    assert checked.rejects.height == 0 and checked.clean["event_type"].to_list() == ["payment"]


def test_statistics_of_any_numeric_column_are_features():
    names = lending.PACK.feature_set().names
    assert {"days_late_max_payment_late_90d", "days_late_mean_payment_missed_all"} <= set(names)
    assert "basket_items_max_order_30d" in returns_pack().feature_set().names
