"""Delta Lake tables for every asset: dagster-deltalake's IO manager with range-correct partitions.

dagster-deltalake turns a time-window partition into the predicate `col = window start`, both
when it overwrites and when it reads. For one day that is right; for a range (a single-run
backfill writing 365 days, or an unpartitioned asset reading every day of `raw_events`) it
silently touches only the first day. This handler keeps the library's connection and storage
configs (local disk here; S3/GCS/ADLS with `storage_options` in production) and replaces the
predicate with `start <= col < end`, so a run replaces exactly its days in one atomic commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import dagster as dg
import polars as pl
from dagster._core.storage.db_io_manager import DbTypeHandler, TableSlice
from dagster_deltalake import LocalConfig
from dagster_deltalake.handler import DeltaLakePyArrowTypeHandler
from dagster_deltalake.io_manager import TableConnection
from dagster_deltalake_polars import DeltaLakePolarsIOManager
from dagster_deltalake_polars.deltalake_polars_type_handler import DeltaLakePolarsTypeHandler
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError


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
        window = _time_window(table_slice)
        if window is None:
            return super().handle_output(context, table_slice, obj, connection)
        column, start, end = window
        df = _storable(obj.collect() if isinstance(obj, pl.LazyFrame) else obj)
        outside = df.filter(~_range_filter(column, start, end)).height
        if outside:
            raise ValueError(
                f"{table_slice.table}: {outside} rows have `{column}` outside the run's partitions "
                f"[{start:%Y-%m-%d}, {end:%Y-%m-%d}); an asset must only return rows of its own days"
            )
        try:
            DeltaTable(connection.table_uri, storage_options=connection.storage_options)
            predicate = f"{column} >= '{start:%Y-%m-%d}' AND {column} < '{end:%Y-%m-%d}'"
        except TableNotFoundError:
            predicate = None  # first write creates the table
        write_deltalake(
            connection.table_uri,
            df.to_arrow(),
            mode="overwrite",
            predicate=predicate,
            partition_by=[column],
            storage_options=connection.storage_options,
        )
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


class DeltaIOManager(DeltaLakePolarsIOManager):
    """Polars frames in and out of Delta tables under `root_uri/<schema>/<asset>`."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [DayRangePolarsTypeHandler(), DeltaLakePyArrowTypeHandler()]


def table_version(uri: str, storage_options: dict[str, str] | None = None) -> int | None:
    """The current version of a Delta table, or None before its first write (for lineage tags)."""
    try:
        return DeltaTable(uri, storage_options=storage_options).version()
    except TableNotFoundError:
        return None


class DeltaTables(dg.ConfigurableResource):
    """Where the Delta tables live, for the IO manager and for direct reads (history, versions)."""

    root_uri: str
    schema_name: str = "eventml"

    def uri(self, table: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{self.schema_name}/{table}"

    def scan(self, table: str) -> pl.LazyFrame | None:
        """The table's current version, or None before its first write."""
        return (
            pl.scan_delta(self.uri(table)) if table_version(self.uri(table)) is not None else None
        )

    def version(self, table: str) -> int | None:
        return table_version(self.uri(table))

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
        frame.write_delta(
            self.uri(table), mode="overwrite", delta_write_options={"schema_mode": "overwrite"}
        )
        return self.version(table)
