"""Delta Lake tables for every asset: dagster-deltalake's IO manager with range-correct partitions.

dagster-deltalake turns a time-window partition into the predicate `col = window start`, both
when it overwrites and when it reads. For one day that is right; for a range (a single-run
backfill writing 365 days, or an unpartitioned asset reading every day of `raw_events`) it
silently touches only the first day. This handler keeps the library's connection and storage
configs (local disk here; S3/GCS/ADLS with `storage_options` in production) and replaces the
predicate with `start <= col < end`, so a run replaces exactly its days in one atomic commit.

Concurrency: Delta's overwrite of a table that does not exist yet is a plain append, so two
first writers at once would both land their rows. Every write here therefore creates the
(empty) table first if it is absent, which Delta makes safe against a concurrent creator, and
then overwrites; of two overwrites of the same rows at once, Delta commits one and refuses the
other, which fails with `ConcurrentWriteError` saying so. Either way each row is there once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import dagster as dg
import polars as pl
from dagster._core.storage.db_io_manager import DbTypeHandler, TableSlice
from dagster_deltalake import LocalConfig
from dagster_deltalake.handler import DeltaLakePyArrowTypeHandler
from dagster_deltalake.io_manager import TableConnection
from dagster_deltalake_polars import DeltaLakePolarsIOManager
from dagster_deltalake_polars.deltalake_polars_type_handler import DeltaLakePolarsTypeHandler
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, Transaction

from eventml.home import table_uri


class ConcurrentWriteError(RuntimeError):
    """Another writer committed to the same rows first; this write changed nothing."""


class PackChangedError(ValueError):
    """A daily table was first written under another version of the dataset pack."""


def stored_schema(uri: str, storage_options=None) -> pl.Schema | None:
    """The table's columns and their types, or None before its first write."""
    if table_version(uri, storage_options) is None:
        return None
    return pl.scan_delta(uri, storage_options=storage_options).collect_schema()


def conform(frame: pl.DataFrame, stored: pl.Schema, table: str) -> pl.DataFrame:
    """`frame` in the stored table's columns: a column the table has and the frame lacks (one
    the pack no longer declares) is written as null; a column the table lacks means the pack
    changed under it, which `make migrate` resolves."""
    added = [c for c in frame.columns if c not in stored]
    retyped = [
        c for c in frame.columns if c in stored and frame.schema[c] not in (stored[c], pl.Null)
    ]
    if added:
        raise PackChangedError(
            f"{table}: this run writes columns the table does not have ({', '.join(added)}): the "
            "dataset pack changed since the table was first written. Run `make migrate` "
            "(python -m ml_assets.migrate) to evolve the source tables and rebuild the derived "
            "ones, then re-run; see docs/dataset-packs.md, 'Changing a pack'."
        )
    try:
        return frame.select(
            (pl.col(c) if c in frame.columns else pl.lit(None)).cast(dtype).alias(c)
            for c, dtype in stored.items()
        )
    except pl.exceptions.InvalidOperationError as error:
        raise PackChangedError(
            f"{table}: columns {retyped} changed type since the table was first written "
            f"({error}); run `make migrate` (python -m ml_assets.migrate)"
        ) from error


def create_if_absent(
    uri: str, schema, partition_by: list[str] | None = None, storage_options=None
) -> None:
    """An empty table with `schema`, unless the table exists (a concurrent creator counts)."""
    try:
        DeltaTable.create(
            uri, schema, partition_by=partition_by, mode="ignore", storage_options=storage_options
        )
    except CommitFailedError:
        if table_version(uri, storage_options) is None:  # nobody created it: a real failure
            raise


def overwrite_or_explain(table: str, write) -> None:
    """Run a Delta overwrite; a lost commit race becomes an error that says what happened."""
    try:
        write()
    except CommitFailedError as error:
        raise ConcurrentWriteError(
            f"{table}: another run wrote the same rows at the same moment and committed first, "
            f"so this run wrote nothing and the table holds that run's rows once. Re-run this "
            f"one if its result should replace them. (Delta: {str(error).splitlines()[0]})"
        ) from error


def write_days(
    uri: str, frame: pl.DataFrame, column: str, start: date, end: date,
    storage_options=None, table: str = "table", commit_metadata: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Replace the days [start, end) of a table partitioned by `column` with `frame`, in one
    Delta commit (carrying `commit_metadata`, and claiming the days as `commit_days` does, so a
    write and a commit of staged days cannot both add the same new days), creating the table
    if it is absent (see the module docstring)."""
    stored = stored_schema(uri, storage_options)
    if stored is not None:
        frame = conform(frame, stored, table)
    arrow = frame.to_arrow()
    create_if_absent(uri, arrow.schema, partition_by=[column], storage_options=storage_options)
    delta = DeltaTable(uri, storage_options=storage_options)  # the claims' and the write's snapshot
    overwrite_or_explain(
        f"{table} [{start:%Y-%m-%d}, {end:%Y-%m-%d})",
        lambda: write_deltalake(
            delta,
            arrow,
            mode="overwrite",
            partition_by=[column],
            storage_options=storage_options,
            predicate=f"{column} >= '{start:%Y-%m-%d}' AND {column} < '{end:%Y-%m-%d}'",
            commit_properties=CommitProperties(
                custom_metadata=commit_metadata or {},
                app_transactions=day_claims(delta, table, start, end),
            ),
        ),
    )


def _time_window(table_slice: TableSlice) -> tuple[str, datetime, datetime] | None:
    """(column, start, end) of the slice's time-window partition, if it has one."""
    for dim in table_slice.partition_dimensions or []:
        window = dim.partitions
        if hasattr(window, "start") and hasattr(window, "end"):
            return dim.partition_expr, window.start, window.end
    return None


def _range_filter(column: str, start: datetime, end: datetime) -> pl.Expr:
    return (pl.col(column) >= start.date()) & (pl.col(column) < end.date())


def _storable(frame: pl.DataFrame) -> pl.DataFrame:
    """Delta has no enum type: Enum and Categorical columns are stored as plain strings."""
    return frame.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String))


class DayRangePolarsTypeHandler(DeltaLakePolarsTypeHandler):
    def to_arrow(self, obj):
        frame = obj.collect() if isinstance(obj, pl.LazyFrame) else obj
        return super().to_arrow(_storable(frame))

    def handle_output(self, context, table_slice: TableSlice, obj, connection: TableConnection):
        uri, options = connection.table_uri, connection.storage_options
        window = _time_window(table_slice)
        df = _storable(obj.collect() if isinstance(obj, pl.LazyFrame) else obj)
        if window is None:
            create_if_absent(uri, df.to_arrow().schema, storage_options=options)
            return overwrite_or_explain(
                table_slice.table,
                lambda: super(DayRangePolarsTypeHandler, self).handle_output(
                    context, table_slice, df, connection
                ),
            )
        column, start, end = window
        outside = df.filter(~_range_filter(column, start, end)).height
        if outside:
            raise ValueError(
                f"{table_slice.table}: {outside} rows have `{column}` outside the run's partitions "
                f"[{start:%Y-%m-%d}, {end:%Y-%m-%d}); an asset must only return rows of its own days"
            )
        write_days(uri, df, column, start, end, options, table=table_slice.table)
        table = DeltaTable(connection.table_uri, storage_options=connection.storage_options)
        context.add_output_metadata(
            {
                "table_uri": connection.table_uri,
                "delta_version": table.version(),
                "dagster/row_count": df.height,
            }
        )

    def load_input(self, context, table_slice: TableSlice, connection: TableConnection):
        window = _time_window(table_slice)
        if window is None:
            return super().load_input(context, table_slice, connection)
        column, start, end = window
        lazy = pl.scan_delta(connection.table_uri, storage_options=connection.storage_options)
        lazy = lazy.filter(_range_filter(column, start, end))
        if table_slice.columns:
            lazy = lazy.select(table_slice.columns)
        return lazy if context.dagster_type.typing_type == pl.LazyFrame else lazy.collect()


@dataclass(frozen=True)
class StagedDays:
    """Rows a step's workers wrote themselves as Parquet files under a day-partitioned table,
    not yet in it (`eventml.features.sharded.staged_shard_features`): returned by the asset,
    committed by the IO manager in one transaction that replaces the run's days, as the write
    of a DataFrame would, without the rows passing through the step's process."""

    table_uri: str  # where the files are: the table the IO manager writes
    files: list[dict]  # path (relative to the table), size, day, rows, modified_ms
    schema: pl.Schema  # the rows' columns, the day column included

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.files)


def commit_days(
    uri: str, staged: StagedDays, column: str, start: date, end: date,
    storage_options=None, table: str = "table",
) -> int:  # fmt: skip
    """Make the staged files the days [start, end) of the table partitioned by `column`, in one
    Delta commit that removes the days' files before (creating the table if it is absent); the
    new version. If the commit fails, the staged files are deleted."""
    try:
        if staged.table_uri != uri:
            raise ValueError(f"{table}: the workers wrote under {staged.table_uri}, not {uri}")
        stored = stored_schema(uri, storage_options)
        if stored is not None:
            _check_columns(staged.schema, stored, table)
        schema = pl.DataFrame(schema=staged.schema).to_arrow().schema
        create_if_absent(uri, schema, partition_by=[column], storage_options=storage_options)
        delta = DeltaTable(uri, storage_options=storage_options)
        adds = [
            AddAction(
                path=f["path"],
                size=f["size"],
                partition_values={column: f["day"]},
                modification_time=f["modified_ms"],
                data_change=True,
                stats=json.dumps({"numRecords": f["rows"]}),
            )
            for f in staged.files
        ]
        days = [(column, ">=", f"{start:%Y-%m-%d}"), (column, "<", f"{end:%Y-%m-%d}")]
        overwrite_or_explain(
            f"{table} [{start:%Y-%m-%d}, {end:%Y-%m-%d})",
            lambda: delta.create_write_transaction(
                adds,
                mode="overwrite",
                schema=delta.schema(),
                partition_by=[column],
                partition_filters=days,
                commit_properties=CommitProperties(
                    app_transactions=day_claims(delta, table, start, end)
                ),
            ),
        )
    except BaseException:
        for f in staged.files:  # in no version: nothing reads them
            (Path(staged.table_uri) / f["path"]).unlink(missing_ok=True)
        raise
    return DeltaTable(uri, storage_options=storage_options).version()


def day_claims(delta: DeltaTable, table: str, start: date, end: date) -> list[Transaction]:
    """An application transaction per day of [start, end) (app id `<table>/<day>`, its next
    version), which every commit of days carries: a commit of files written elsewhere reads
    nothing, so Delta would let it and another commit add the same new days at once; two
    commits that claim a day conflict, and one fails."""
    days = pl.date_range(_as_date(start), _as_date(end), closed="left", eager=True)
    ids = [f"{table}/{day}" for day in days]
    return [Transaction(app_id=i, version=(delta.transaction_version(i) or 0) + 1) for i in ids]


def _as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def _check_columns(staged: pl.Schema, stored: pl.Schema, table: str) -> None:
    """Staged rows fit the table as a DataFrame's write does (`conform`): no column the table
    lacks, none of another type; a column the rows lack reads as null."""
    added = [c for c in staged if c not in stored]
    retyped = [c for c in staged if c in stored and staged[c] != stored[c]]
    if added or retyped:
        raise PackChangedError(
            f"{table}: the workers wrote columns the table does not have ({added}) or of "
            f"another type ({retyped}): the dataset pack changed since the table was first "
            "written. Run `make migrate` (python -m ml_assets.migrate), then re-run."
        )


class StagedDaysTypeHandler(DbTypeHandler[StagedDays]):
    supported_types = (StagedDays,)

    def handle_output(self, context, table_slice: TableSlice, obj, connection: TableConnection):
        uri, options = connection.table_uri, connection.storage_options
        column, start, end = _time_window(table_slice)
        version = commit_days(uri, obj, column, start, end, options, table=table_slice.table)
        context.add_output_metadata(
            {"table_uri": uri, "delta_version": version, "dagster/row_count": obj.rows}
        )

    def load_input(self, context, table_slice: TableSlice, connection: TableConnection):
        raise TypeError(f"{table_slice.table}: read it as a Polars DataFrame or LazyFrame")


class DeltaIOManager(DeltaLakePolarsIOManager):
    """Polars frames in and out of Delta tables under `root_uri/<schema>/<asset>`, and rows that
    workers wrote themselves (`StagedDays`) into them."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [DayRangePolarsTypeHandler(), DeltaLakePyArrowTypeHandler(), StagedDaysTypeHandler()]


def table_version(uri: str, storage_options: dict[str, str] | None = None) -> int | None:
    """The current version of a Delta table, or None before its first write (for lineage tags)."""
    try:
        return DeltaTable(uri, storage_options=storage_options).version()
    except TableNotFoundError:
        return None


# Tables written together, the companion first; the main table's commit names the companion's
# version, and readers of the companion read that version (see `write_days_together`).
COMPANION_OF = {"event_rejects": "raw_events"}
NAMES_VERSION_OF = "eventml.version_of."


class DeltaTables(dg.ConfigurableResource):
    """Where the Delta tables live, for the IO manager and for direct reads (history, versions)."""

    root_uri: str
    schema_name: str = "eventml"

    def uri(self, table: str) -> str:
        return table_uri(self.root_uri, table, self.schema_name)

    def scan(self, table: str) -> pl.LazyFrame | None:
        """The table's current version (for a companion, the version its main table names), or
        None before its first write."""
        if table_version(self.uri(table)) is None:
            return None
        return pl.scan_delta(self.uri(table), version=self.published_version(table))

    def published_version(self, table: str) -> int | None:
        """The version of a companion table that its main table's newest commit names (None:
        the current one). A run killed between the two commits leaves it at the last pair."""
        main = COMPANION_OF.get(table)
        if main is None or table_version(self.uri(main)) is None:
            return None
        for commit in DeltaTable(self.uri(main)).history(limit=100):
            if (named := commit.get(NAMES_VERSION_OF + table)) is not None:
                return int(named)
        return None

    def write_days_together(
        self, main: str, frame: pl.DataFrame, companion: str, companion_frame: pl.DataFrame,
        column: str, start: date, end: date,
    ) -> dict[str, int]:  # fmt: skip
        """Replace the days [start, end) of `companion`, then of `main` in a commit that names
        the companion's new version, so readers see both tables' new days or neither."""
        write_days(self.uri(companion), _storable(companion_frame), column, start, end,
                   table=companion)  # fmt: skip
        version = self.version(companion)
        write_days(self.uri(main), _storable(frame), column, start, end, table=main,
                   commit_metadata={NAMES_VERSION_OF + companion: str(version)})  # fmt: skip
        return {main: self.version(main), companion: version}

    def version(self, table: str) -> int | None:
        return table_version(self.uri(table))

    def schema(self, table: str) -> pl.Schema | None:
        return stored_schema(self.uri(table))

    def add_columns(self, table: str, columns: dict[str, pl.DataType]) -> None:
        """New nullable columns (null in every stored row), in one Delta commit. A main table's
        commit names its companion's current version (alter the companion first), so readers
        see both tables evolved; run it while no ingest runs."""
        arrow = pl.DataFrame(schema=columns).to_arrow().schema
        named = {NAMES_VERSION_OF + companion: str(self.version(companion))
                 for companion, main in COMPANION_OF.items()
                 if main == table and self.version(companion) is not None}  # fmt: skip
        DeltaTable(self.uri(table)).alter.add_columns(
            list(Schema.from_arrow(arrow).fields),
            commit_properties=CommitProperties(custom_metadata=named),
        )

    def retire(self, names: list[str]) -> Path:
        """Move tables aside, under `_retired/<UTC time>/`, where they stay readable; their next
        write starts them afresh. Local tables only."""
        root = Path(self.uri("_retired")) / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        root.mkdir(parents=True)
        for name in names:
            shutil.move(self.uri(name), root / name)
        return root

    def io_manager(self) -> DeltaIOManager:
        # An unpartitioned table is rewritten whole, so its schema may change with it (a new
        # feature, a new column); partitioned writes keep the table's schema.
        return DeltaIOManager(
            root_uri=self.root_uri,
            schema=self.schema_name,
            storage_options=LocalConfig(),
            overwrite_schema=True,
        )

    def overwrite(self, table: str, frame: pl.DataFrame) -> int:
        """Replace a whole table outside the IO manager (e.g. a side table of rejects) in one
        Delta commit; returns the new version."""
        frame = _storable(frame)
        create_if_absent(self.uri(table), frame.to_arrow().schema)
        overwrite_or_explain(
            table,
            lambda: frame.write_delta(
                self.uri(table), mode="overwrite", delta_write_options={"schema_mode": "overwrite"}
            ),
        )
        return self.version(table)
