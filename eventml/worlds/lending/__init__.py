"""The lending world: a pay-over-time lender deciding on each checkout (`pack.yaml`), and
the simulator that generates its people and their events (`simulate`)."""

from eventml.worlds.calendar import date_of, day_of
from eventml.worlds.lending.simulate import (
    PACK,
    WorldConfig,
    hidden_users,
    iter_days,
    simulate,
    simulate_day,
)

# The demo's "today": the eve of the regime shift, so `make advance` has a future to move into.
DEMO_DAYS = WorldConfig.shift_day or WorldConfig.n_days
DEMO_CONFIG: dict = {}  # the reference world and the shipped training settings

__all__ = [
    "DEMO_CONFIG",
    "DEMO_DAYS",
    "PACK",
    "WorldConfig",
    "date_of",
    "day_of",
    "hidden_users",
    "iter_days",
    "simulate",
    "simulate_day",
]
