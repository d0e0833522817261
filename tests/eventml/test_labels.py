"""Decisions and labels: a label exists only once its horizon has passed, and counts outcomes in
(ts, ts + horizon] of the same entity."""

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from eventml.labels import build_decisions, decision_summary
from eventml.schema import TS_TYPE
from eventml.worlds.lending import PACK as LENDING_PACK

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def events(*rows: tuple) -> pl.DataFrame:
    """rows: (entity, day offset from T0, event type, policy decision or None)."""
    frame = pl.DataFrame(
        {
            "entity_id": [r[0] for r in rows],
            "event_id": [f"e{i}" for i in range(len(rows))],
            "ts": [T0 + timedelta(days=r[1]) for r in rows],
            "event_type": [r[2] for r in rows],
            "policy_decision": [r[3] if len(r) > 3 else None for r in rows],
        },
        schema_overrides={"ts": TS_TYPE},
    )
    schema = LENDING_PACK.event_schema()
    return frame.select(
        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, t).alias(c)
        for c, t in schema.items()
    ).with_columns(pl.when(pl.col("event_type") == "application").then(100.0).alias("amount"))


def default_of(frame: pl.DataFrame, as_of: datetime | None = None) -> pl.DataFrame:
    return build_decisions(frame, LENDING_PACK, as_of).sort("ts")


def test_one_row_per_application_with_labels_maturity_and_oracle():
    frame = events(("u1", 0, "signup"), ("u1", 1, "application", "approve"), ("u1", 2, "session"))
    d = build_decisions(frame, LENDING_PACK)
    assert d.height == 1
    assert d["decision_id"].to_list() == ["e1"]
    for col in (
        "default_90d",
        "default_90d_matures_at",
        "default_90d_matured",
        "fraud_60d",
        "true_p_default",
    ):
        assert col in d.columns
    assert d["default_90d_matures_at"][0] == T0 + timedelta(days=91)
    assert d["default_90d"].dtype == pl.Int8


@pytest.mark.parametrize(
    ("delinquent_on_day", "label"),
    [(1, 1), (90, 1), (91, 0), (0, 0), (-5, 0)],
    ids=["day1", "day90_last_day_in_window", "day91_outside", "same_instant_not_after", "before"],
)
def test_default_window_is_ts_to_ts_plus_horizon(delinquent_on_day, label):
    frame = events(
        ("u1", 10, "application", "approve"),
        ("u1", 10 + delinquent_on_day, "delinquency_60"),
        ("u1", 400, "session"),  # data runs long enough for the label to mature
    )
    assert default_of(frame)["default_90d"].to_list() == [label]


def test_label_is_null_until_its_horizon_has_passed():
    frame = events(("u1", 0, "application", "approve"), ("u1", 5, "delinquency_60"))
    for days, known in [(89.9, False), (90, True), (120, True)]:
        d = default_of(frame, as_of=T0 + timedelta(days=days))
        assert d["default_90d_matured"].to_list() == [known]
        # an early delinquency is not revealed before maturity: no bias towards fast outcomes
        assert d["default_90d"].to_list() == ([1] if known else [None])


def test_as_of_defaults_to_the_latest_event_not_the_wall_clock():
    frame = events(("u1", 0, "application", "approve"), ("u1", 60, "session"))
    d = default_of(frame)
    assert d["fraud_60d_matured"].to_list() == [True]
    assert d["default_90d_matured"].to_list() == [False]


def test_applies_when_restricts_default_to_approved_loans():
    frame = events(
        ("u1", 0, "application", "decline"),
        ("u1", 1, "application", "approve"),
        ("u1", 30, "delinquency_60"),
        ("u1", 30, "fraud_confirmed"),
        ("u1", 200, "session"),
    )
    d = default_of(frame)
    assert d["default_90d"].to_list() == [None, 1]
    assert d["fraud_60d"].to_list() == [1, 1]  # fraud applies to every application


def test_other_entities_outcomes_do_not_count():
    frame = events(
        ("u1", 0, "application", "approve"), ("u2", 3, "delinquency_60"), ("u2", 200, "session")
    )
    assert default_of(frame)["default_90d"].to_list() == [0]


def test_summary_counts_labeled_rows_and_rates():
    frame = events(
        ("u1", 0, "application", "approve"),
        ("u1", 10, "delinquency_60"),
        ("u2", 0, "application", "approve"),
        ("u3", 0, "application", "decline"),
        ("u3", 200, "session"),
    )
    s = decision_summary(build_decisions(frame, LENDING_PACK), LENDING_PACK)
    assert s["decisions"] == 3
    assert s["default_90d"] == {"matured": 3, "labeled": 2, "positive_rate": 0.5}
