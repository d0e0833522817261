"""The card world: a card issuer scoring each payment for fraud (`pack.yaml`), and the simulator
of its cards, merchants, terminals and planted fraud (`simulate`)."""

from eventml.worlds.calendar import date_of, day_of
from eventml.worlds.cards.simulate import PACK, WorldConfig, iter_days, simulate

# The demo's "today": the whole year (its labels mature within two weeks).
DEMO_DAYS = WorldConfig.n_days

__all__ = ["DEMO_DAYS", "PACK", "WorldConfig", "date_of", "day_of", "iter_days", "simulate"]
