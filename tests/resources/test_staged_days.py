"""Rows that workers wrote under a day-partitioned table themselves (`StagedDays`) become its days
in one commit: the run's days replaced, the others kept; two runs committing the same new days
at once cannot both land them, whether both staged their rows or one writes a frame; rows that
do not fit the table are refused and their files removed."""

import os
import uuid
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction

from resources.delta import PackChangedError, StagedDays, commit_days, day_claims, write_days


def staged(uri: str, rows: pl.DataFrame) -> StagedDays:
    """`rows` written under the table as a worker writes them, one file per day."""
    files = []
    for (day,), part in rows.partition_by("day", as_dict=True, include_key=False).items():
        relative = f"day={day:%Y-%m-%d}/part-{uuid.uuid4().hex}.parquet"
        (Path(uri) / relative).parent.mkdir(parents=True, exist_ok=True)
        part.write_parquet(Path(uri) / relative)
        stat = os.stat(Path(uri) / relative)
        files.append({"path": relative, "size": stat.st_size, "day": f"{day:%Y-%m-%d}",
                      "rows": part.height, "modified_ms": int(stat.st_mtime * 1000)})  # fmt: skip
    return StagedDays(uri, files, rows.schema)


def days(*values: tuple[int, str]) -> pl.DataFrame:
    return pl.DataFrame({"day": [date(2025, 1, d) for d, _ in values], "x": [x for _, x in values]})


@pytest.fixture
def table(tmp_path) -> str:
    uri = str(tmp_path / "t")
    write_deltalake(uri, days((1, "a"), (2, "b"), (3, "c")).to_arrow(), partition_by=["day"])
    return uri


def read(uri: str) -> list[tuple]:
    return pl.read_delta(uri).sort("day", "x").select("day", "x").rows()


def test_the_runs_days_are_replaced_and_the_others_kept(table):
    commit_days(table, staged(table, days((2, "B"), (3, "C"), (3, "C2"))), "day",
                date(2025, 1, 2), date(2025, 1, 4))  # fmt: skip
    assert [x for _, x in read(table)] == ["a", "B", "C", "C2"]


def test_two_commits_of_the_same_new_days_at_once_cannot_both_land(table):
    """Both read the table before either commits, as two runs started together do."""
    first, second = DeltaTable(table), DeltaTable(table)
    commits = []
    for delta, rows in ((first, days((5, "one"))), (second, days((5, "two")))):
        files = staged(table, rows).files
        adds = [AddAction(f["path"], f["size"], {"day": f["day"]}, f["modified_ms"], True,
                          None) for f in files]  # fmt: skip
        claims = day_claims(delta, "t", date(2025, 1, 5), date(2025, 1, 6))
        commits.append(lambda d=delta, a=adds, c=claims: d.create_write_transaction(
            a, mode="overwrite", schema=d.schema(), partition_by=["day"],
            partition_filters=[("day", ">=", "2025-01-05"), ("day", "<", "2025-01-06")],
            commit_properties=CommitProperties(app_transactions=c),
        ))  # fmt: skip
    commits[0]()
    with pytest.raises(CommitFailedError):
        commits[1]()
    assert [x for d, x in read(table) if d == date(2025, 1, 5)] == ["one"]


def test_a_frame_written_while_a_commit_of_staged_days_waits_keeps_it_from_landing_them_twice(
    table,
):
    """A run on Ray and a run in process add the same new day: the staged commit read the table
    first, the frame's write lands first."""
    waiting = DeltaTable(table)
    files = staged(table, days((5, "staged"))).files
    adds = [AddAction(f["path"], f["size"], {"day": f["day"]}, f["modified_ms"], True, None)
            for f in files]  # fmt: skip
    claims = day_claims(waiting, "t", date(2025, 1, 5), date(2025, 1, 6))
    write_days(table, days((5, "frame")), "day", date(2025, 1, 5), date(2025, 1, 6), table="t")
    with pytest.raises(CommitFailedError):
        waiting.create_write_transaction(
            adds, mode="overwrite", schema=waiting.schema(), partition_by=["day"],
            partition_filters=[("day", ">=", "2025-01-05"), ("day", "<", "2025-01-06")],
            commit_properties=CommitProperties(app_transactions=claims),
        )  # fmt: skip
    assert [x for d, x in read(table) if d == date(2025, 1, 5)] == ["frame"]


def test_rows_that_do_not_fit_the_table_are_refused_and_their_files_removed(table):
    rows = days((2, "B")).with_columns(pl.lit(1.0).alias("new_feature"))
    wrong = staged(table, rows)
    with pytest.raises(PackChangedError, match="new_feature.*make migrate"):
        commit_days(table, wrong, "day", date(2025, 1, 2), date(2025, 1, 3))
    assert not any((Path(table) / f["path"]).exists() for f in wrong.files)
    assert [x for _, x in read(table)] == ["a", "b", "c"]
