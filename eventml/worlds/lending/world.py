"""The lending world's state, carried from one day to the next, and the step that advances it:
stress and its shocks, confirmed fraud shutting accounts, and what people do besides borrowing
(signups, sessions, profile and device changes); the loans' part of the step is `loans`.

Kept apart from the population (drawn once) and the frame layout (`events`): the state lives
here, and `step` hands each part of the day its own random stream, which is what makes a day
computed alone equal the same day of a bulk run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl

from eventml.worlds.lending.config import (
    DAY_US,
    DELINQUENCY,
    DEVICE_CHANGE,
    FRAUD_CONFIRMED,
    LATE,
    MISSED,
    NIGHT_US,
    PROFILE_CHANGE,
    SESSION,
    SIGNUP,
    WorldConfig,
    _rng,
)
from eventml.worlds.lending.events import _chunk, _day_columns, _day_frame
from eventml.worlds.lending.loans import _Loans
from eventml.worlds.lending.population import _population


class _World(_Loans):
    """The state carried from one day to the next, and the step that advances it."""

    def __init__(self, config: WorldConfig):
        self.cfg, self.pop = config, _population(config)
        n = config.n_users
        rho = config.stress_persistence
        self.stress_noise = 0.5 * np.sqrt(1 - rho**2)  # stationary sd of stress without shocks: 0.5
        self.stress = _rng(config, -1, 2).normal(0, 0.5, n)
        self.device = np.zeros(n, np.int64)  # how many times each user changed device
        self.closed = np.zeros(n, bool)  # confirmed fraud: the account is shut
        # What the incumbent policy can see (refreshed nightly from emitted events).
        self.late_score, self.delinquencies, self.velocity = np.zeros(n), np.zeros(n), np.zeros(n)
        self.open_loans = np.zeros(n)  # plans with installments still to come
        # The oracle's bookkeeping (see `loans`): no new delinquency may land on or before
        # `clean_until`; `pending_*` are the delinquencies drawn and not yet emitted.
        self.clean_until = np.full(n, -1, np.int64)
        self.pending_user, self.pending_day = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.booked: dict[int, list[dict]] = {}  # loans waiting for their first due date
        self.due: dict[int, list[dict]] = {}  # installments to settle on their due day
        self.outbox: dict[int, list[dict]] = {}  # events decided earlier, emitted on their day
        self.start_us = int(
            datetime.fromisoformat(config.start).replace(tzinfo=UTC).timestamp() * 1e6
        )

    def step(self, day: int) -> dict[str, np.ndarray]:
        """Advance the world through `day`; the day's events as columns (`frame` makes them a
        frame: only the days asked for are, the others only move the state)."""
        cfg, pop = self.cfg, self.pop
        rng = _rng(cfg, day, 0)
        # Confirmed fraud shuts the account at the nightly batch: nothing of it is emitted after.
        confirmed = np.flatnonzero(
            (pop.confirm_day == day) & (pop.signup_day <= day) & ~self.closed
        )
        self.closed[confirmed] = True
        active = (pop.signup_day <= day) & ~self.closed

        a, b = np.searchsorted(pop.shock_day, [day, day + 1])
        self.stress = cfg.stress_persistence * self.stress + rng.normal(
            0, self.stress_noise, cfg.n_users
        )
        np.add.at(self.stress, pop.shock_user[a:b], pop.shock_size[a:b])
        # Stress acts through a bounded pressure: stacked shocks cannot make anyone apply 100x.
        self.pressure = np.clip(self.stress, -1.5, 3.0)

        self._settle_loans(day, _rng(cfg, day, 4))
        self._settle_installments(day, _rng(cfg, day, 1))
        chunks = self._act(day, active, _rng(cfg, day, 2))
        chunks += self._apply(day, active, _rng(cfg, day, 3))
        chunks += [
            {k: v[~self.closed[c["user"]]] for k, v in c.items()} for c in self.outbox.pop(day, [])
        ]
        chunks.append(_chunk(confirmed, FRAUD_CONFIRMED, rng.integers(0, NIGHT_US, confirmed.size)))
        cols = _day_columns(chunks)
        self._observe(cols)
        return cols

    def _act(self, day: int, active: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """Signups, sessions, profile and device changes: what people do besides checkouts."""
        pop, n = self.pop, self.cfg.n_users
        users = np.arange(n)
        signing = pop.signup_day == day
        n_sess = rng.poisson(pop.session_rate * np.exp(0.2 * self.pressure)) * active
        sess_user = np.repeat(users, n_sess)
        # Ordinary changes (a new phone, a move) for everyone but a fraudster running the scheme,
        # whose changes are the planned ones. Stress brings more moves and new numbers.
        ordinary = active & ((pop.fraud_type == 0) | (day < pop.attack_day - 3))
        p_profile = self.cfg.profile_changes_per_year / 365 * (1 + np.maximum(self.pressure, 0))
        profile = ordinary & (rng.random(n) < p_profile)
        profile |= active & (pop.profile_day == day)
        device = ordinary & (rng.random(n) < self.cfg.device_changes_per_year / 365)
        device |= active & (pop.device_day == day)
        prof_user, dev_user = np.flatnonzero(profile), np.flatnonzero(device)
        # A bust-out takes over the contact details (email or phone) before the new device.
        prof_field = rng.integers(0, np.where(pop.profile_day[prof_user] == day, 2, 3))
        # Everything of the signup day follows the signup; a new device is noticed at a moment of
        # the day, and that day's earlier events still carry the old one.
        self.signup_tod = np.where(signing, rng.integers(NIGHT_US, DAY_US - NIGHT_US, n), NIGHT_US)
        sign_user = np.flatnonzero(signing)
        self.change_tod = np.full(n, DAY_US)
        self.change_tod[dev_user] = self._tod(dev_user, rng)
        self.device_before = self.device.copy()
        self.device[dev_user] += 1
        return [
            _chunk(
                sign_user,
                SIGNUP,
                self.signup_tod[sign_user],
                channel=pop.channel[sign_user],
                device=sign_user * 1000 + self.device_before[sign_user],
            ),
            self._user_chunk(sess_user, SESSION, rng),
            self._user_chunk(prof_user, PROFILE_CHANGE, rng, profile=prof_field),
            _chunk(
                dev_user,
                DEVICE_CHANGE,
                self.change_tod[dev_user],
                channel=self._channel(dev_user, rng),
                device=dev_user * 1000 + self.device[dev_user],
            ),
        ]

    def _channel(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.where(
            rng.random(user.size) < 0.8, self.pop.channel[user], rng.integers(0, 3, user.size)
        )

    def _tod(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Times of day for user-initiated events; on the signup day, after the signup."""
        lo = self.signup_tod[user]
        return lo + (rng.random(user.size) * (DAY_US - lo)).astype(np.int64)

    def _user_chunk(
        self, user: np.ndarray, etype: int, rng: np.random.Generator, **cols: np.ndarray
    ) -> dict:
        tod = self._tod(user, rng)
        device = self.device_before[user] + (tod >= self.change_tod[user])
        return _chunk(
            user, etype, tod, channel=self._channel(user, rng), device=user * 1000 + device, **cols
        )

    def frame(self, day: int, cols: dict[str, np.ndarray]) -> pl.DataFrame:
        return _day_frame(day, cols, self.pop, self.start_us)

    def _observe(self, cols: dict[str, np.ndarray]) -> None:
        """Refresh what the incumbent policy knows from what was emitted today."""
        n = self.cfg.n_users
        weight = np.select([cols["etype"] == LATE, cols["etype"] == MISSED], [0.5, 1.5], 0.0)
        self.late_score = 0.98 * self.late_score + np.bincount(cols["user"], weight, minlength=n)
        self.delinquencies += np.bincount(cols["user"], cols["etype"] == DELINQUENCY, minlength=n)
