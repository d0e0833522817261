"""The event contract: what a valid event is, and where every other row goes."""

from datetime import UTC, datetime

import polars as pl
import pytest

from eventml.schema import DatasetSpec, SpecError
from eventml.validation import validate

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def spec() -> DatasetSpec:
    return DatasetSpec.from_dict(
        {
            "name": "shop",
            "source_start": "2025-01-01",
            "event_types": ["order", "refund", "late_payment"],
            "categorical": ["merchant"],
            "numeric": ["term"],
            "decision_event_types": ["order"],
            "labels": [
                {"name": "late_30d", "kind": "event_within", "event_type": "late_payment", "horizon_days": 30}
            ],
        }
    )


def good_row(**overrides) -> dict:
    row = {
        "entity_id": "u1",
        "event_id": "e1",
        "ts": "2025-03-01T12:00:00Z",
        "event_type": "order",
        "amount": "10.5",
        "merchant": "m1",
        "term": "3",
    }
    return row | overrides


def frame(*rows: dict) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema={c: pl.String for c in rows[0]})


def test_a_valid_row_becomes_a_typed_event(spec):
    result = validate(frame(good_row()), spec, now=NOW)
    assert result.rejects.height == 0
    assert result.clean.schema == pl.Schema(spec.event_schema())
    event = result.clean.row(0, named=True)
    assert event["ts"] == datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert event["amount"] == 10.5 and event["term"] == 3.0


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"entity_id": None}, "missing_entity_id"),
        ({"entity_id": "  "}, "missing_entity_id"),
        ({"event_id": None}, "missing_event_id"),
        ({"ts": None}, "missing_ts"),
        ({"event_type": None}, "missing_event_type"),
        ({"ts": "yesterday"}, "unparseable_ts"),
        ({"event_type": "teleport"}, "unknown_event_type"),
        ({"amount": "ten"}, "unparseable_amount"),
        ({"amount": "-0.01"}, "negative_amount"),
        ({"amount": "inf"}, "non_finite_amount"),
        ({"amount": "NaN"}, "non_finite_amount"),
        ({"amount": "1e308"}, "out_of_range_amount"),  # within float, past the contract's bound
        ({"term": "-2e9"}, "out_of_range_term"),
        ({"event_id": "x" * 1_000_000}, "too_long_event_id"),
        ({"entity_id": "u" * 257}, "too_long_entity_id"),
        ({"term": "three"}, "unparseable_term"),
        ({"ts": "2024-12-31T23:59:59Z"}, "ts_before_source_start"),
        ({"ts": "2027-01-01T00:00:00Z"}, "ts_in_future"),
    ],
)
def test_each_kind_of_bad_row_is_rejected_with_its_reason(spec, overrides, reason):
    bad = good_row(event_id="bad") | overrides
    result = validate(frame(good_row(event_id="ok"), bad), spec, now=NOW)
    assert result.clean["event_id"].to_list() == ["ok"]
    assert result.rejects["reason"].to_list() == [reason]
    assert result.rejects["field"][0] in spec.event_schema()


def test_rejected_rows_keep_what_arrived(spec):
    result = validate(frame(good_row(ts="31/02/2025 25:00", amount="1e999x")), spec, now=NOW, source="f.csv")
    reject = result.rejects.row(0, named=True)
    assert reject["ts"] == "31/02/2025 25:00" and reject["amount"] == "1e999x"
    assert reject["source"] == "f.csv"


def test_a_duplicate_event_id_keeps_the_first_copy(spec):
    result = validate(frame(good_row(amount="1"), good_row(amount="2")), spec, now=NOW)
    assert result.clean["amount"].to_list() == [1.0]
    assert result.rejects["reason"].to_list() == ["duplicate_event_id"]


def test_a_broken_copy_cannot_shadow_a_good_one(spec):
    result = validate(frame(good_row(ts="garbage"), good_row()), spec, now=NOW)
    assert result.clean.height == 1
    assert result.rejects["reason"].to_list() == ["unparseable_ts"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T12:00:00Z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        ("2025-03-01T14:00:00+02:00", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        ("2025-03-01 12:00:00.250", datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)),
        ("2025-03-01", datetime(2025, 3, 1, tzinfo=UTC)),
    ],
)
def test_iso_timestamps_are_read_as_utc(spec, text, expected):
    assert validate(frame(good_row(ts=text)), spec, now=NOW).clean["ts"][0] == expected


def test_counts_are_conserved(spec):
    rows = [good_row(event_id=str(i), amount=str(i - 5), ts=f"2025-0{1 + i % 9}-01") for i in range(40)]
    rows += [good_row(event_id="3"), good_row(entity_id=None), good_row(event_type="x")]
    raw = frame(*rows)
    result = validate(raw, spec, now=NOW)
    assert result.clean.height + result.rejects.height == raw.height
    assert sum(result.reject_counts().values()) == result.rejects.height
    assert set(result.clean["event_id"]).isdisjoint(set(result.rejects["event_id"]) - {"3"})


def test_a_source_with_its_own_column_names_is_mapped_by_the_spec(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        """
name: cards
source_start: 2025-01-01
event_types: [payment, chargeback]
categorical: [mcc]
decision_event_types: [payment]
labels:
  - {name: fraud, kind: column, column: is_fraud, horizon_days: 45}
numeric: [is_fraud]
columns: {entity_id: card, event_id: txn, ts: when, event_type: kind, amount: value_eur, mcc: merchant_code}
ts_format: "%d/%m/%Y %H:%M"
"""
    )
    spec = DatasetSpec.from_yaml(spec_file)
    csv = tmp_path / "cards.csv"
    csv.write_text(
        "card,txn,when,kind,value_eur,merchant_code,is_fraud,unused\n"
        "c1,t1,02/03/2025 10:30,payment,12.00,5411,0,x\n"
        "c1,t2,03/03/2025 11:00,chargeback,12.00,5411,,x\n"
    )
    result = validate(pl.read_csv(csv, infer_schema=False), spec, now=NOW)
    assert result.rejects.height == 0
    assert result.clean.columns == list(spec.event_schema())
    assert result.clean["entity_id"].to_list() == ["c1", "c1"]
    assert result.clean["ts"][0] == datetime(2025, 3, 2, 10, 30, tzinfo=UTC)
    assert result.clean["mcc"].to_list() == ["5411", "5411"]


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"decision_event_types": ["refundz"]}, "decision_event_types"),
        ({"labels": [{"name": "x", "kind": "event_within", "horizon_days": 3}]}, "event_type"),
        ({"labels": [{"name": "x", "kind": "event_within", "event_type": "nope", "horizon_days": 3}]}, "labels.x.event_type"),
        ({"categorical": ["amount"]}, "shadow core columns"),
        ({"columns": {"colour": "c"}}, "columns"),
        ({"event_types": "order"}, "event_types"),
    ],
)
def test_a_bad_spec_is_refused_with_the_field_named(change, names):
    data = {
        "name": "s",
        "source_start": "2025-01-01",
        "event_types": ["order", "refund"],
        "decision_event_types": ["order"],
    } | change
    with pytest.raises(SpecError, match=names):
        DatasetSpec.from_dict(data)
