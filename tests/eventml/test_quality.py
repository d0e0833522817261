"""The quality checks behind raw_events' blocking asset checks."""

from datetime import UTC, date, datetime, timedelta

import polars as pl

from eventml.quality import QualityThresholds, check_daily_volume, check_events, check_reject_rate
from eventml.schema import DatasetSpec

SPEC = DatasetSpec.from_dict(
    {"name": "s", "source_start": "2025-01-01", "event_types": ["a"], "decision_event_types": ["a"]}
)
D0 = date(2025, 2, 1)


def events(n: int, day: date = D0, dup: int = 0) -> pl.DataFrame:
    ids = [f"e{i}" for i in range(n)] + [f"e{i}" for i in range(dup)]
    return pl.DataFrame(
        {
            "entity_id": ["u"] * len(ids),
            "event_id": ids,
            "ts": [datetime(day.year, day.month, day.day, tzinfo=UTC)] * len(ids),
            "event_type": ["a"] * len(ids),
            "amount": [1.0] * len(ids),
        },
        schema=SPEC.event_schema(),
    ).with_columns(pl.lit(day).alias("day"))


def by_name(outcomes):
    return {o.name: o for o in outcomes}


def test_a_clean_day_passes_every_check():
    prior = {D0 - timedelta(days=i): 100 for i in range(1, 15)}
    outcomes = by_name(check_events(events(100), events(0).head(0), SPEC, prior))
    assert all(o.passed for o in outcomes.values()), {k: o.description for k, o in outcomes.items()}


def test_duplicates_and_wrong_schema_fail():
    outcomes = by_name(check_events(events(10, dup=2), events(0), SPEC, {}))
    assert not outcomes["unique_event_ids"].passed
    bad = events(10).with_columns(pl.col("amount").cast(pl.String))
    assert not by_name(check_events(bad, events(0), SPEC, {}))["schema"].passed


def test_volume_is_judged_against_the_trailing_median_once_there_is_history():
    prior = {D0 - timedelta(days=i): 100 for i in range(1, 29)}
    assert check_daily_volume({D0: 120}, prior, QualityThresholds()).passed
    assert not check_daily_volume({D0: 30}, prior, QualityThresholds()).passed
    assert not check_daily_volume({D0: 500}, prior, QualityThresholds()).passed
    young = {D0 - timedelta(days=i): 100 for i in range(1, 20)}
    outcome = check_daily_volume({D0: 5}, young, QualityThresholds())
    assert outcome.passed and outcome.figures["days_judged"] == 0


def test_reject_rate_has_a_ceiling():
    assert check_reject_rate(990, 10, QualityThresholds(max_reject_rate=0.02)).passed
    assert not check_reject_rate(900, 100, QualityThresholds(max_reject_rate=0.02)).passed
