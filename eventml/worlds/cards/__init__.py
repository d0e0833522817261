"""The card world: a card issuer scoring each payment for fraud (`pack.yaml`), and the simulator
of its cards, merchants, terminals and planted fraud (`simulate`)."""

from eventml.worlds.calendar import date_of, day_of
from eventml.worlds.cards.simulate import PACK, WorldConfig, iter_days, references, simulate

# The demo: the reference world's first four months (its counterfeit ring arrives on day 130,
# for `make advance` to bring and the sensors to catch). Every payment is a decision, so the
# encoder reads every payment's history: three epochs keep it within minutes on two cores.
DEMO_DAYS = 120
DEMO_CONFIG = {"ops": {"sequence_encoder": {"config": {"epochs": 3}}}}

__all__ = [
    "DEMO_CONFIG",
    "DEMO_DAYS",
    "PACK",
    "WorldConfig",
    "date_of",
    "day_of",
    "iter_days",
    "references",
    "simulate",
]
