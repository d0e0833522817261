"""The daily partitions every event-time asset shares.

The range is the source's: the simulated world's year by default, or EVENTML_START /
EVENTML_DAYS for a landing zone with other dates. Read when the code location loads.
"""

import os
from datetime import date, timedelta

import dagster as dg

from eventml.simulate import WorldConfig

START = date.fromisoformat(os.environ.get("EVENTML_START", WorldConfig.start))
N_DAYS = int(os.environ.get("EVENTML_DAYS", WorldConfig.n_days))
PARTITION_DAYS = (START, START + timedelta(days=N_DAYS))  # [first, end) of every partition day

daily = dg.DailyPartitionsDefinition(
    start_date=START.isoformat(), end_date=PARTITION_DAYS[1].isoformat()
)


def run_days(context: dg.AssetExecutionContext) -> tuple[date, date]:
    """[first day, day after the last) of the run's partitions."""
    window = context.partition_time_window
    return window.start.date(), window.end.date()
