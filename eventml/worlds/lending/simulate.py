"""The synthetic lending world: people, their event histories, and the truth behind them.

A pay-over-time lender sees sessions, checkouts (loan applications), its own policy's
decisions, monthly installments, delinquencies, profile and device changes, chargebacks and
confirmed fraud. Behind the events sit hidden traits (creditworthiness, fraud type) and a
financial-stress process with shocks, which is what makes histories predictive: stress shows
up as late payments and bursts of applications weeks before a default; bust-out fraud as a
profile change, a new device and a run of large applications; stolen identities as a new
device right after signup. A regime shift (`shift_day`, `shift_strength`) hits a segment
with a macro shock, moves the application mix and raises base default rates.

Determinism and streaming: the world is a state stepped one day at a time; each day draws
only from `default_rng([seed, 1 + day, stream])`, and future events (installments,
delinquencies, chargebacks) are scheduled into the state and emitted on their day. So a day
computed alone equals the same day of the bulk run; every day is vectorized over all users.

The oracle: each application records `true_p_default` and `true_p_fraud`, the probability of
its label as the spec defines it, given what the simulator knows at that moment (how, in `loans`).

The world's parts: `config` (the pack's vocabularies as codes, the constants, `WorldConfig`),
`population` (the people and their hidden traits), `world` (the state and its daily step: what
people do), `loans` (checkouts, the policy's decisions, loans and the oracle) and `events` (the
event chunks and the day's frame). This module is the entry: it streams or collects the days.
"""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from eventml.worlds.lending.config import PACK, WorldConfig
from eventml.worlds.lending.population import hidden_users
from eventml.worlds.lending.world import _World

__all__ = ["PACK", "WorldConfig", "hidden_users", "iter_days", "simulate", "simulate_day"]


def iter_days(config: WorldConfig, days: range | None = None) -> Iterator[tuple[int, pl.DataFrame]]:
    """Each requested day's events, in order: the streaming form of `simulate`. The state is
    stepped from day 0 whatever the range, so a day is the same whichever run produced it."""
    days = range(config.n_days) if days is None else days
    if days.step != 1 or (len(days) and (days.start < 0 or days.stop > config.n_days)):
        raise ValueError(f"days must be a contiguous range inside [0, {config.n_days}), got {days}")
    if not len(days):
        return
    world = _World(config)
    for day in range(days.stop):
        cols = world.step(day)
        if day >= days.start:
            yield day, world.frame(day, cols)


def simulate(config: WorldConfig, days: range | None = None) -> pl.DataFrame:
    """Events of `days` (default: all), sorted by (ts, event_id), in `PACK`'s schema."""
    frames = [frame for _, frame in iter_days(config, days)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=PACK.event_schema())


def simulate_day(config: WorldConfig, day: int) -> pl.DataFrame:
    return simulate(config, range(day, day + 1))
