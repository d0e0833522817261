"""The landing zone: files are admitted once by content into an append-only log; a file that
cannot be read is quarantined with its reason and the others go on; every row of every file is
counted exactly once, clean or rejected, however the days are run."""

import os
from datetime import UTC, date, datetime

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventml.landing import admit, arrivals, landing_files, manifest, read_landed
from eventml.schema import DatasetSpec
from eventml.sources import ingest_days

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PARTITIONS = (date(2025, 1, 1), date(2025, 2, 1))
HEADER = "customer,id,time,what,eur,channel\n"


@pytest.fixture
def spec(bank_spec) -> DatasetSpec:
    return bank_spec


def good_csv(*ids: str, day: int = 2) -> str:
    return HEADER + "".join(f"c{i},{i},2025-01-{day:02d}T08:00:00Z,login,,app\n" for i in ids)


def test_the_inbox_lists_finished_data_files_only(tmp_path):
    for name in ("a.csv", "b.parquet", "_c.csv", ".d.csv", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in landing_files(tmp_path)] == ["a.csv", "b.parquet"]
    assert landing_files(tmp_path / "missing") == []


def test_a_file_is_admitted_once_by_content_with_the_days_it_holds(tmp_path, spec):
    (tmp_path / "a.csv").write_text(good_csv("1", "2") + "c3,3,2025-01-05T00:00:00Z,login,,web\n")
    [arrival] = admit(tmp_path, spec, PARTITIONS)
    assert (arrival.status, arrival.rows, arrival.days) == ("landed", 3, ("2025-01-02", "2025-01-05"))
    assert admit(tmp_path, spec, PARTITIONS) == []  # the same bytes again: nothing new
    (tmp_path / "copy.csv").write_text((tmp_path / "a.csv").read_text())
    assert admit(tmp_path, spec, PARTITIONS) == []  # same content, another name: same arrival
    assert read_landed(tmp_path, spec).height == 3


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.csv", b"", "empty.csv: the file is empty"),
        ("latin1.csv", (HEADER + "c1,1,2025-01-02T08:00:00Z,login,,Müller\n").encode("latin-1"), "latin1.csv: not UTF-8"),
        ("semicolons.csv", HEADER.replace(",", ";").encode() + b"c1;1;2025-01-02;login;;app\n",
         "semicolons.csv: its columns do not match dataset spec 'bank': expected ['customer', 'id', 'time', 'what']"),
        ("upper.csv", HEADER.upper().encode() + b"c1,1,2025-01-02,login,,app\n", "found ['CUSTOMER', 'ID', 'TIME'"),
        ("blob.csv", b"lorem ipsum " * 100_000, "upper"),  # replaced below: any header mismatch
        ("future.csv", good_csv("1").replace("2025-01-02", "2031-01-02").encode(), "none of its 1 rows has a timestamp inside the partitions"),
    ],
)
def test_a_file_that_cannot_be_ingested_is_quarantined_with_its_reason_and_the_others_go_on(
    tmp_path, spec, name, content, reason
):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "z_good.csv").write_text(good_csv("7"))
    new = {a.name: a for a in admit(tmp_path, spec, PARTITIONS)}
    assert new["z_good.csv"].status == "landed"
    assert new[name].status == "quarantined"
    assert (reason if name != "blob.csv" else "do not match dataset spec") in new[name].reason
    assert (tmp_path / "_quarantine" / new[name].source).read_bytes() == content  # kept as it came
    assert read_landed(tmp_path, spec)["event_id"].to_list() == ["7"]
    table = manifest(tmp_path)
    assert dict(zip(table["name"], table["status"])) == {name: "quarantined", "z_good.csv": "landed"}


def test_a_nested_column_is_a_file_error_naming_it(tmp_path, spec):
    pl.DataFrame({"customer": ["c1"], "id": ["1"], "time": ["2025-01-02T00:00:00Z"], "what": ["login"],
                  "eur": [None], "channel": [{"name": "app"}]}).write_parquet(tmp_path / "nested.parquet")  # fmt: skip
    [arrival] = admit(tmp_path, spec, PARTITIONS)
    assert arrival.status == "quarantined" and "['channel'] are nested" in arrival.reason


def test_a_day_is_rebuilt_from_what_arrived_not_from_what_the_inbox_holds_now(tmp_path, spec):
    (tmp_path / "day2.csv").write_text(good_csv(*map(str, range(1, 297))))
    admit(tmp_path, spec, PARTITIONS)
    (tmp_path / "day2.csv").unlink()  # archived by the user once ingested
    (tmp_path / "late.csv").write_text(good_csv("a", "b", "c", "d", "e"))
    admit(tmp_path, spec, PARTITIONS)
    day = ingest_days(read_landed(tmp_path, spec), spec, date(2025, 1, 2), date(2025, 1, 3),
                      now=NOW, partitions=PARTITIONS)  # fmt: skip
    assert day.clean.height == 301


def test_admitting_from_several_processes_at_once_admits_each_file_once(tmp_path, spec):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for i in range(8):
        (tmp_path / f"f{i}.csv").write_text(good_csv(str(i)))
    # spawned, not forked: a fork of a process running Polars' threads can hang
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        new = [a for got in pool.map(admit, [tmp_path] * 4, [spec] * 4, [PARTITIONS] * 4) for a in got]
    assert sorted(a.name for a in new) == [f"f{i}.csv" for i in range(8)]
    assert len(arrivals(tmp_path)) == 8


# ---------------------------------------------------------------- conservation, fuzzed

ROW_KINDS = {
    "clean": "c{i},{i},2025-01-{d:02d}T08:00:00Z,login,12.5,app",
    "no_entity": ",{i},2025-01-{d:02d}T08:00:00Z,login,,app",
    "bad_ts": "c{i},{i},not a time,login,,app",
    "future": "c{i},{i},2029-01-{d:02d}T08:00:00Z,login,,app",
    "before_start": "c{i},{i},2019-01-{d:02d}T08:00:00Z,login,,app",
    "after_partitions": "c{i},{i},2025-03-{d:02d}T08:00:00Z,login,,app",
    "unknown_type": "c{i},{i},2025-01-{d:02d}T08:00:00Z,levitate,,app",
    "huge_amount": "c{i},{i},2025-01-{d:02d}T08:00:00Z,transfer,1e308,app",
    "negative": "c{i},{i},2025-01-{d:02d}T08:00:00Z,transfer,-5,app",
    "bad_number": "c{i},{i},2025-01-{d:02d}T08:00:00Z,transfer,lots,app",
    "long_id": "c{i},{i}" + "x" * 300 + ",2025-01-{d:02d}T08:00:00Z,login,,app",
    "duplicate": "c{i},dup,2025-01-{d:02d}T08:00:00Z,login,,app",
}
BROKEN_FILES = {"empty": b"", "latin1": "caf\xe9\n".encode("latin-1"), "wrong_header": b"a;b\n1;2\n"}

rows = st.tuples(st.sampled_from(sorted(ROW_KINDS)), st.integers(1, 28))
files = st.one_of(
    st.lists(rows, min_size=1, max_size=25).map(lambda r: ("csv", r)),
    st.sampled_from(sorted(BROKEN_FILES)).map(lambda b: ("broken", b)),
)


# make test runs 40 examples; EVENTML_FUZZ_EXAMPLES=1000 pytest tests/eventml/test_landing.py the full count.
@settings(max_examples=int(os.environ.get("EVENTML_FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(drops=st.lists(st.lists(files, min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 30), max_size=4, unique=True))  # fmt: skip
def test_every_row_of_every_file_is_clean_rejected_or_quarantined_once_across_repeated_runs(
    tmp_path_factory, spec, drops, cuts
):
    """Files of every malformed kind arrive in batches; after each batch, every day is ingested
    again in runs split at `cuts` (a partition overwrite per run). Per file, rows in = clean +
    rejected, or the whole file is quarantined."""
    inbox = tmp_path_factory.mktemp("inbox")
    stored: dict[date, tuple[pl.DataFrame, pl.DataFrame]] = {}
    edges = [PARTITIONS[0], *sorted(date(2025, 1, c) for c in cuts if c > 1), PARTITIONS[1]]
    sent, owners, serial = {}, {}, 0
    for batch, dropped in enumerate(drops):
        for n, (kind, what) in enumerate(dropped):
            name = f"b{batch}f{n}.csv"
            if kind == "broken":
                (inbox / name).write_bytes(BROKEN_FILES[what] + name.encode())
                sent[name] = None
                continue
            lines = []
            for row_kind, day in what:
                serial += 1
                lines.append(ROW_KINDS[row_kind].format(i=serial, d=day))
                owners.setdefault(lines[-1].split(",")[1], []).append(name)
            (inbox / name).write_text(HEADER + "\n".join(lines) + "\n")
            sent[name] = len(lines)
        admit(inbox, spec, PARTITIONS)
        raw = read_landed(inbox, spec)
        for a, b in zip(edges, edges[1:]):
            run = ingest_days(raw, spec, a, b, now=NOW, partitions=PARTITIONS)
            for day in [d for d in stored if a <= d < b]:
                del stored[day]  # the run replaces its days
            for day in {*run.clean["day"], *run.rejects["day"]}:
                stored[day] = (run.clean.filter(pl.col("day") == day), run.rejects.filter(pl.col("day") == day))

        by_arrival = {a.source: a for a in arrivals(inbox)}
        order = [a.name for a in arrivals(inbox)]
        counted: dict[str, int] = {}
        for _, rejected in stored.values():
            for source in rejected["source"]:
                counted[by_arrival[source].name] = counted.get(by_arrival[source].name, 0) + 1
        clean_ids = [i for clean, _ in stored.values() for i in clean["event_id"]]
        for event_id in clean_ids:  # a clean event's file: a duplicated id's is its first arrival
            owner = min(owners[event_id], key=order.index)
            counted[owner] = counted.get(owner, 0) + 1
        assert len(clean_ids) == len(set(clean_ids))  # no event twice
        for arrival in by_arrival.values():
            if sent[arrival.name] is None:
                assert arrival.status == "quarantined" and arrival.reason
            elif arrival.status == "landed":
                assert counted.get(arrival.name, 0) == sent[arrival.name], arrival.name
            else:  # a file of rows none of which falls inside the partitions
                assert arrival.name not in counted and "none of its" in arrival.reason
        assert set(sent) == {a.name for a in by_arrival.values()}
