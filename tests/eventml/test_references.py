"""Reference tables: rows that hold from a time on, validated like events and attached to every
event as of its own time; the pack refuses a reference that cannot work, naming the key."""

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from eventml.landing import read_reference_files
from eventml.online_store import SQLiteOnlineStore
from eventml.references import attach, validate_reference
from eventml.schema import DatasetSpec, SpecError

T0 = datetime(2025, 3, 1, tzinfo=UTC)
SPEC = DatasetSpec.from_dict(
    {
        "name": "shops",
        "source_start": "2025-01-01T00:00:00Z",
        "event_types": ["visit", "order"],
        "categorical": ["shop", "tier", "segment"],
        "numeric": ["return_days"],
        "categories": {"tier": ["gold", "basic"]},
        "decision_event_types": ["order"],
        "columns": {"entity_id": "customer", "shop": "store"},
        "references": [
            {"name": "shops", "key": "shop", "columns": ["tier", "return_days"],
             "valid_from": "effective"},
            {"name": "customers", "key": "entity_id", "columns": ["segment"]},
        ],
    }
)  # fmt: skip
SHOPS, CUSTOMERS = SPEC.references


def events(*rows: tuple) -> pl.DataFrame:
    """(entity_id, ts, shop) rows as clean events; the referenced columns hold stale values that
    attaching must replace."""
    return pl.DataFrame(
        [
            {"entity_id": e, "event_id": f"e{i}", "ts": ts, "event_type": "order", "amount": 1.0,
             "shop": shop, "tier": "stale", "segment": "stale", "return_days": -1.0}
            for i, (e, ts, shop) in enumerate(rows)
        ],
        schema=SPEC.event_schema(),
    )  # fmt: skip


def clean(ref, rows: list[dict]) -> pl.DataFrame:
    checked = validate_reference(pl.DataFrame(rows), ref, SPEC)
    assert checked.rejects.height == 0, checked.rejects
    return checked.clean


def test_every_event_takes_its_keys_row_in_force_at_its_own_time():
    shops = clean(SHOPS, [
        {"store": "s1", "effective": "2025-03-01", "tier": "basic", "return_days": "14"},
        {"store": "s1", "effective": "2025-03-10T12:00:00Z", "tier": "gold", "return_days": "30"},
        {"store": "s2", "effective": "2025-03-05", "tier": "gold", "return_days": "7"},
    ])  # fmt: skip
    changed = datetime(2025, 3, 10, 12, tzinfo=UTC)
    seen = events(
        ("a", changed - timedelta(microseconds=1), "s1"),  # just before the change
        ("a", changed, "s1"),  # at the instant a row starts, it holds
        ("b", T0 + timedelta(days=2), "s2"),  # before s2's first row: nothing known yet
        ("b", T0 + timedelta(days=20), "s2"),
        ("c", T0 + timedelta(days=20), "s9"),  # a shop with no row
        ("c", T0 + timedelta(days=20), None),  # no shop at all
    )
    out = attach(seen, {"shops": shops}, SPEC)
    assert out.columns == seen.columns and out["event_id"].to_list() == seen["event_id"].to_list()
    assert out["tier"].to_list() == ["basic", "gold", None, "gold", None, None]
    assert out["return_days"].to_list() == [14.0, 30.0, None, 7.0, None, None]
    # A table never materialized is empty: its columns are null, whatever the feed said.
    assert out["segment"].is_null().all()


def test_an_entity_keyed_table_attaches_by_entity():
    customers = clean(CUSTOMERS, [
        {"customer": "a", "valid_from": "2025-01-01", "segment": "new"},
        {"customer": "a", "valid_from": "2025-03-05", "segment": "loyal"},
    ])  # fmt: skip
    out = attach(events(("a", T0, "s1"), ("a", T0 + timedelta(days=9), "s1")),
                 {"customers": customers}, SPEC)  # fmt: skip
    assert out["segment"].to_list() == ["new", "loyal"]


def test_bad_rows_are_rejected_with_their_reason_and_a_later_row_corrects_an_earlier_one():
    rows = pl.DataFrame(
        {
            "store": ["s1", None, "s2", "s3", "s4", "s1"],
            "effective": ["2025-03-01", "2025-03-01", "someday", "2025-03-01", "2025-03-01",
                          "2025-03-01T00:00:00Z"],
            "tier": ["basic", "gold", "gold", "platinum", "gold", "gold"],
            "return_days": ["14", "14", "14", "14", "two weeks", "21"],
        }
    )  # fmt: skip
    checked = validate_reference(rows, SHOPS, SPEC, source="terms.csv")
    assert checked.rejects["reason"].to_list() == [
        "missing_shop", "unparseable_valid_from", "unknown_tier", "unparseable_return_days",
    ]  # fmt: skip
    assert set(checked.rejects["source"]) == {"terms.csv"}
    # s1's two rows for the same instant: the last delivered holds.
    assert checked.clean.to_dicts() == [
        {"shop": "s1", "valid_from": T0, "tier": "gold", "return_days": 21.0}
    ]
    assert checked.clean.height + checked.rejects.height == rows.height - 1


def test_requests_do_not_carry_what_a_reference_supplies():
    assert SPEC.request_categorical == ("shop",)
    assert SPEC.request_numeric == ()
    assert SPEC.referenced_columns == {
        "tier": "shops",
        "return_days": "shops",
        "segment": "customers",
    }


@pytest.mark.parametrize(
    "reference, error",
    [
        ({"name": "x", "key": "store_id", "columns": ["tier"]}, r"references.x.key: 'store_id'"),
        ({"name": "x", "key": "shop", "columns": ["rating"]}, r"'rating' is not a declared attribute"),
        ({"name": "x", "key": "shop", "columns": ["was_bad"]}, r"'was_bad' holds a label"),
        ({"name": "x", "key": "shop", "columns": ["shop"]}, r"'shop' is already supplied \(its key\)"),
        ({"name": "x", "key": "tier", "columns": ["segment"]}, r"x.key: 'tier' is supplied by shops"),
        ({"name": "shops", "key": "shop", "columns": ["segment"]}, r"two references share"),
    ],
)  # fmt: skip
def test_a_reference_that_cannot_work_is_refused_naming_its_key(reference, error):
    data = SPEC.model_dump(mode="json")
    data["numeric"] = [*data["numeric"], "was_bad"]
    data["labels"] = [{"name": "bad", "kind": "column", "column": "was_bad", "horizon_days": 3}]
    data["references"] = [data["references"][0], reference]
    with pytest.raises(SpecError, match=error):
        DatasetSpec.from_dict(data)


def test_the_online_store_holds_a_reference_table_whole_and_replaces_it(tmp_path):
    store = SQLiteOnlineStore(tmp_path / "store.db", SPEC)
    first = clean(SHOPS, [
        {"store": "s1", "effective": "2025-03-01", "tier": "basic", "return_days": "14"},
        {"store": "s2", "effective": "2025-03-01", "tier": "gold", "return_days": "7"},
    ])  # fmt: skip
    store.write_references("shops", first)
    assert store.references("shops", ["s2", "s1", None]).sort("shop").equals(first)
    assert store.references("shops", ["s9"]) is None
    store.write_references("shops", first.filter(pl.col("shop") == "s2"))
    assert store.references("shops", ["s1"]) is None


def test_reference_files_are_read_oldest_first_and_an_unreadable_one_is_named(tmp_path):
    folder = tmp_path / "references" / "shops"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_text("store,effective,tier,return_days\ns1,2025-03-01,basic,14\n")
    (folder / "b.csv").write_text("store,effective,tier,return_days\ns1,2025-03-01,gold,30\n")
    (folder / "c.csv").write_bytes(b"")
    rows, unreadable = read_reference_files(tmp_path, SHOPS, SPEC)
    assert rows["source"].to_list() == ["a.csv", "b.csv"]
    assert list(unreadable) == ["c.csv"] and "empty" in unreadable["c.csv"]
    checked = validate_reference(rows.drop("source"), SHOPS, SPEC, rows["source"])
    assert checked.clean["tier"].to_list() == ["gold"]


def test_no_rows_or_rows_in_no_known_column_lose_nothing():
    empty = validate_reference(pl.DataFrame(), SHOPS, SPEC, pl.Series([], dtype=pl.String))
    assert empty.clean.height == 0 and empty.rejects.height == 0
    strangers = pl.DataFrame({"what": ["a", "b", "c"]})
    checked = validate_reference(strangers, SHOPS, SPEC, source="odd.csv")
    assert checked.clean.height == 0
    assert checked.rejects["reason"].to_list() == ["missing_shop"] * 3
