"""Sources: landing-zone files in a user's own columns, a run's days, and a realistic feed."""

from datetime import UTC, date, datetime

import polars as pl
import pytest

from eventml.landing import admit, read_landed
from eventml.schema import DatasetSpec
from eventml.sources import FAULTS, ingest_days, inject_faults

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def spec(bank_spec) -> DatasetSpec:
    return bank_spec


@pytest.fixture
def zone(tmp_path):
    pl.DataFrame(
        {
            "customer": ["c1", "c2", "c3", "c4"],
            "id": ["1", "2", "3", "4"],
            "time": ["2025-01-02T08:00:00Z", "not a time", "2025-01-03T09:00:00Z", "2025-01-03T10:00:00Z"],
            "what": ["login", "login", "transfer", "wire"],
            "eur": [None, None, "100", "5"],
            "channel": ["app", "web", "app", "app"],
        }
    ).write_csv(tmp_path / "a.csv")
    pl.DataFrame(
        {
            "customer": ["c1", "c5"],
            "id": ["1", "5"],  # "1" repeats a.csv's first row: a replay across files
            "time": [datetime(2025, 1, 4, tzinfo=UTC), datetime(2025, 1, 4, 1, tzinfo=UTC)],
            "what": ["login", "transfer"],
            "eur": [None, 20.0],
            "channel": ["web", None],
        }
    ).write_parquet(tmp_path / "b.parquet")
    (tmp_path / "_c.csv").write_text("still being written")
    (tmp_path / "notes.txt").write_text("not data")
    return tmp_path


PARTITIONS = (date(2025, 1, 1), date(2025, 2, 1))


def landed(zone, spec):
    admit(zone, spec, PARTITIONS)
    return read_landed(zone, spec)


def test_landing_files_in_foreign_columns_ingest_by_day(zone, spec):
    raw = landed(zone, spec)
    whole = ingest_days(raw, spec, *PARTITIONS, now=NOW, partitions=PARTITIONS)
    assert whole.clean["event_id"].to_list() == ["1", "3", "5"]
    assert whole.clean.filter(pl.col("event_id") == "5")["amount"].to_list() == [20.0]
    assert whole.reject_counts() == {"duplicate_event_id": 1, "unknown_event_type": 1, "unparseable_ts": 1}
    assert {e: s.split("-", 1)[1] for e, s in zip(whole.rejects["event_id"], whole.rejects["source"])} == {"1": "b.parquet", "2": "a.csv", "4": "a.csv"}


def test_every_row_lands_in_exactly_one_day_however_runs_split_the_days(zone, spec):
    raw = landed(zone, spec)
    days = [date(2025, 1, d) for d in range(1, 6)]
    per_day = [ingest_days(raw, spec, d0, d1, now=NOW, partitions=PARTITIONS) for d0, d1 in zip(days, days[1:])]
    clean = pl.concat([v.clean for v in per_day])
    rejects = pl.concat([v.rejects for v in per_day])
    assert clean.height + rejects.height == raw.height
    whole = ingest_days(raw, spec, days[0], days[-1], now=NOW, partitions=PARTITIONS)
    assert clean.equals(whole.clean) and rejects.sort("event_id").equals(whole.rejects.sort("event_id"))
    # the unparseable row travels with its file's first day
    assert rejects.filter(pl.col("reason") == "unparseable_ts")["day"].to_list() == [date(2025, 1, 2)]


def test_rejects_without_a_day_of_their_own_are_counted_once_on_their_files_first_day(tmp_path, spec):
    """Rows from the future, from before the source's start, with no readable time, or on a day
    outside the partitions: each is counted exactly once, on a day a run covers, however often
    and in whatever ranges the days are run."""
    (tmp_path / "odd.csv").write_text(
        "customer,id,time,what,eur,channel\n"
        "c1,1,2025-01-10T08:00:00Z,login,,app\n"  # clean: the file's first day is Jan 10
        "c1,2,2030-01-01T00:00:00Z,login,,app\n"  # the future
        "c1,3,2019-06-01T00:00:00Z,login,,app\n"  # before source_start
        "c1,4,yesterday,login,,app\n"  # unreadable
        "c1,5,2025-03-01T00:00:00Z,login,,app\n"  # clean, but after the partitions end
        "c1,6,2025-01-20T00:00:00Z,login,,app\n"
    )
    raw = landed(tmp_path, spec)
    weeks = [date(2025, 1, 1) + (date(2025, 1, 8) - date(2025, 1, 1)) * i for i in range(6)]
    for _ in range(3):  # repeated runs over every week re-place the same rows
        per_week = [ingest_days(raw, spec, a, b, now=NOW, partitions=PARTITIONS) for a, b in zip(weeks, weeks[1:])]
    clean = pl.concat([w.clean for w in per_week])
    rejects = pl.concat([w.rejects for w in per_week])
    assert clean.height + rejects.height == raw.height == 6
    assert sorted(clean["event_id"]) == ["1", "6"]
    assert dict(zip(rejects["event_id"], rejects["reason"])) == {
        "2": "ts_in_future", "3": "ts_before_source_start", "4": "unparseable_ts", "5": "outside_partitions"}
    assert set(rejects["day"]) == {date(2025, 1, 10)}


def test_faults_break_about_the_asked_share_of_rows_deterministically():
    events = pl.DataFrame(
        {
            "entity_id": [f"u{i}" for i in range(20_000)],
            "event_id": [f"e{i}" for i in range(20_000)],
            "ts": [datetime(2025, 1, 2, tzinfo=UTC)] * 20_000,
            "event_type": ["login"] * 20_000,
            "amount": [1.0] * 20_000,
        }
    )
    broken = inject_faults(events, rate=0.05, seed=3)
    assert broken.equals(inject_faults(events, rate=0.05, seed=3))
    assert not broken.equals(inject_faults(events, rate=0.05, seed=4))
    changed = broken.head(events.height).join(
        events.with_columns(pl.all().cast(pl.String)), on="event_id", how="left", suffix="_orig"
    )
    n_changed = changed.filter(
        pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_orig")) for c in ["entity_id", "ts", "event_type", "amount"])
    ).height
    n_dupes = broken.height - events.height
    assert 0.04 < (n_changed + n_dupes) / events.height < 0.06
    assert n_dupes > 0 and len(FAULTS) == 5
    assert inject_faults(events, rate=0.0, seed=3).height == events.height
