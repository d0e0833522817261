"""The daily partitions every event-time asset shares: the range the deployment's dataset pack
declares (`partitions`), read when the code location loads."""

from datetime import date

import dagster as dg

from eventml.worlds import load_pack, selected_pack

_RANGE = load_pack(selected_pack()).partition_range
START = _RANGE.start
PARTITION_DAYS = (_RANGE.start, _RANGE.end)  # [first, end) of every partition day

daily = dg.DailyPartitionsDefinition(
    start_date=START.isoformat(), end_date=PARTITION_DAYS[1].isoformat()
)


def run_days(context: dg.AssetExecutionContext) -> tuple[date, date]:
    """[first day, day after the last) of the run's partitions."""
    window = context.partition_time_window
    return window.start.date(), window.end.date()
