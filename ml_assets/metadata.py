"""How assets explain themselves in the UI: markdown tables and value counts from Polars."""

import dagster as dg
import polars as pl


def table_md(frame: pl.DataFrame, max_rows: int = 10) -> dg.MetadataValue:
    if frame.height == 0:
        return dg.MetadataValue.md("_no rows_")
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=max_rows,
        tbl_cols=-1,
        fmt_str_lengths=40,
    ):
        return dg.MetadataValue.md(str(frame.head(max_rows)))


def counts_md(frame: pl.DataFrame, column: str) -> dg.MetadataValue:
    """Rows per value of `column`, most frequent first, with each value's share."""
    counts = frame.group_by(column).len("rows").sort("rows", descending=True)
    counts = counts.with_columns((pl.col("rows") / max(frame.height, 1)).round(4).alias("share"))
    return table_md(counts, max_rows=50)


def png_md(png: bytes) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata panel."""
    import base64

    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{base64.b64encode(png).decode()})")


def lineage(context, tables, reads: list[str]) -> dict:
    """What an MLflow run needs to be rebuilt: the Dagster run, the Delta versions it read and
    the range of event days behind them."""
    tags = {
        "dagster_run_id": context.run_id,
        **{f"delta_version.{t}": tables.version(t) for t in reads},
    }
    events = tables.scan("raw_events")
    if events is not None:
        span = events.select(pl.col("day").min().alias("first"), pl.col("day").max().alias("last"))
        first, last = span.collect().row(0)
        tags["raw_events.days"] = f"{first}..{last}"
    return tags


def check_result(asset: str, outcome) -> dg.AssetCheckResult:
    """An `eventml` CheckOutcome as the asset check result the UI shows."""
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=outcome.name,
        passed=outcome.passed,
        description=outcome.description,
        metadata=outcome.figures,
    )
