"""Features keyed by another column than the entity: per terminal, counted over whole days
before the decision's day, with a label counted only once it has matured."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from eventml.features import compute_features, features_for_one, key_activity
from eventml.pack import DatasetPack
from eventml.schema import SpecError

DAY0 = datetime(2025, 1, 1, tzinfo=UTC)


def pack(**features) -> DatasetPack:
    return DatasetPack.from_dict({
        "name": "terminals", "source_start": "2025-01-01",
        "event_types": ["payment"], "decision_event_types": ["payment"],
        "categorical": ["terminal_id"], "identifiers": ["terminal_id"], "numeric": ["is_fraud"],
        "labels": [{"name": "fraud", "kind": "column", "column": "is_fraud", "horizon_days": 14}],
        "policy": {"fraud": 0.5},
        "features": {"windows": ["7d"], "keyed": [{"key": "terminal_id", "windows": ["7d", "30d"],
                     "count_event_types": ["payment"], "labels": ["fraud"]}], **features},
    })  # fmt: skip


def payments(*rows: tuple[str, str, float, int]) -> pl.DataFrame:
    """(card, terminal, day + fraction, is_fraud) per payment."""
    return pl.DataFrame(
        {
            "entity_id": [r[0] for r in rows],
            "event_id": [f"e{i}" for i in range(len(rows))],
            "ts": [DAY0 + timedelta(days=r[2]) for r in rows],
            "event_type": "payment",
            "amount": 10.0,
            "terminal_id": [r[1] for r in rows],
            "is_fraud": [float(r[3]) for r in rows],
        }
    )


EVENTS = payments(
    ("a", "T1", 3.5, 1),  # matures on day 17.5
    ("b", "T1", 10.5, 1),  # matures on day 24.5: not known on day 20
    ("c", "T1", 12.2, 0),  # matures on day 26.2
    ("d", "T1", 19.5, 0),
    ("e", "T1", 20.1, 0),  # the same day as the decision: not counted
    ("f", "T2", 15.0, 1),
    ("g", "T1", 20.6, 0),  # the decision
    ("h", None, 20.7, 0),  # a decision without a terminal
)


def features(events: pl.DataFrame, p: DatasetPack) -> pl.DataFrame:
    fs = p.feature_set()
    activity = key_activity(events, p, fs, date(2025, 1, 1), date(2025, 3, 1))
    decisions = events.rename({"event_id": "decision_id"})
    return compute_features(events, decisions, fs, activity).sort("decision_id")


def test_a_terminal_counts_whole_days_before_the_decision_and_only_matured_labels():
    row = features(EVENTS, pack()).filter(pl.col("decision_id") == "e6").row(0, named=True)
    assert row["terminal_id_n_payment_7d"] == 1  # days 13-19: c (day 12) is out, e the same day
    assert row["terminal_id_n_payment_30d"] == 4  # a, b, c, d
    assert row["terminal_id_n_fraud_30d"] == 1  # a matured on day 17; b matures on day 24
    assert row["terminal_id_fraud_rate_30d"] == 1.0  # a is the only matured decision
    assert row["terminal_id_n_fraud_7d"] == 1 and row["terminal_id_fraud_rate_7d"] == 1.0


def test_a_key_with_nothing_matured_has_no_rate_and_no_key_has_no_features():
    table = features(EVENTS, pack())
    first = table.filter(pl.col("decision_id") == "e0").row(0, named=True)
    assert first["terminal_id_n_payment_30d"] == 0 and first["terminal_id_fraud_rate_30d"] is None
    none = table.filter(pl.col("decision_id") == "e7").row(0, named=True)
    assert none["terminal_id_n_payment_30d"] is None


def test_an_unmatured_label_changes_no_keyed_feature():
    flipped = EVENTS.with_columns(
        pl.when(pl.col("event_id").is_in(["e1", "e2", "e3", "e4"]))
        .then(1.0 - pl.col("is_fraud"))
        .otherwise(pl.col("is_fraud"))
        .alias("is_fraud")
    )
    before = features(EVENTS, pack()).filter(pl.col("decision_id") == "e6")
    assert before.equals(features(flipped, pack()).filter(pl.col("decision_id") == "e6"))


def test_activity_day_by_day_equals_the_bulk_and_a_live_request_reads_it_the_same():
    p = pack()
    fs = p.feature_set()
    bulk = key_activity(EVENTS, p, fs, date(2025, 1, 1), date(2025, 3, 1))
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(59)]
    daily = pl.concat([key_activity(EVENTS, p, fs, d, d + timedelta(days=1)) for d in days])
    assert daily.sort(daily.columns).equals(bulk.sort(bulk.columns))
    batch = features(EVENTS, p).filter(pl.col("decision_id") == "e6").row(0, named=True)
    decision = EVENTS.filter(pl.col("event_id") == "e6").row(0, named=True)
    one = features_for_one(EVENTS, decision, fs, bulk)
    assert {k: one[k] for k in batch if k != "decision_id"} == {
        k: v for k, v in batch.items() if k != "decision_id"
    }


def test_keyed_features_need_the_activity():
    with pytest.raises(ValueError, match="keyed by 'terminal_id': pass `activity`"):
        compute_features(EVENTS, EVENTS.rename({"event_id": "decision_id"}), pack().feature_set())


@pytest.mark.parametrize(
    "keyed, names",
    [
        ({"key": "shop"}, "features.keyed[0].key: 'shop' is not an input categorical column"),
        ({"key": "terminal_id", "labels": ["chargeback"]}, "features.keyed[0].labels: ['chargeback']"),
        ({"key": "terminal_id", "windows": ["6h"]}, "keyed features count whole days"),
    ],
)  # fmt: skip
def test_a_keyed_family_that_cannot_work_names_the_key(keyed, names):
    with pytest.raises(SpecError) as raised:
        pack(keyed=[keyed])
    assert names in str(raised.value)
