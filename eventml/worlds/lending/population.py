"""The lending world's people: everything fixed per user when the world is made (signup day,
demographics, hidden creditworthiness, the policy's noisy view of it, activity rates, fraud
type and its planned days, the stress shocks to come), and `hidden_users`, that truth as a frame.

Kept apart from the daily step because it is drawn once, from its own streams (day -1), before
any day is stepped: the people do not depend on which days are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from eventml.worlds.lending.config import (
    AGE_BANDS,
    CONFIRM_DELAY,
    FRAUD_TYPES,
    INCOME_BANDS,
    REGIONS,
    WorldConfig,
    _rng,
)
from eventml.worlds.lending.events import _entity_ids, _nullable


@dataclass(frozen=True)
class _Population:
    """Everything fixed per user when the world is made; one array per trait, index = user."""

    signup_day: np.ndarray
    region: np.ndarray
    age_band: np.ndarray
    income_band: np.ndarray
    creditworthiness: np.ndarray  # hidden; drives default and payment behaviour
    bureau_score: np.ndarray  # the incumbent policy's noisy view of creditworthiness
    session_rate: np.ndarray
    application_rate: np.ndarray
    channel: np.ndarray  # preferred channel
    fraud_type: np.ndarray
    profile_day: np.ndarray  # bust-out's profile change; -1 none
    device_day: np.ndarray  # the fraudster's new device; -1 none
    attack_day: np.ndarray  # first day of the application run; -1 none
    confirm_day: np.ndarray  # fraud_confirmed; -1 none
    shift_segment: np.ndarray  # who the macro shock hits: low and lower-middle incomes
    shock_user: np.ndarray  # stress shocks as (user, day, size), sorted by day
    shock_day: np.ndarray
    shock_size: np.ndarray


def _population(config: WorldConfig) -> _Population:
    rng, n, days = _rng(config, -1, 0), config.n_users, config.n_days
    initial = rng.random(n) < config.initial_cohort
    signup_day = np.where(
        initial, rng.integers(0, min(config.initial_cohort_days, days), n), rng.integers(0, days, n)
    )
    age = rng.choice(5, n, p=[0.15, 0.3, 0.25, 0.17, 0.13])
    income = rng.choice(5, n, p=[0.2, 0.25, 0.3, 0.15, 0.1])
    income = np.clip(income + (age >= 2) * rng.integers(0, 2, n), 0, 4)  # earnings rise with age
    cw = 0.3 * (income - 2) + 0.15 * (age - 2) + rng.normal(0, 0.9, n)
    fraud_u = rng.random(n)
    fraud = np.where(
        fraud_u < config.bust_out_rate,
        1,
        np.where(fraud_u < config.bust_out_rate + config.stolen_identity_rate, 2, 0),
    )
    # Fraudsters look creditworthy: bust-outs build a good record, stolen identities are chosen for one.
    cw = np.where(fraud > 0, rng.normal(1.0, 0.4, n), cw)
    # Bust-out behaves for months, changes the profile, gets a new device, then applies in a run;
    # a stolen identity switches to the fraudster's device a day or two after signup.
    attack = np.where(
        fraud == 1,
        signup_day + rng.integers(90, 241, n),
        np.where(fraud == 2, signup_day + rng.integers(2, 4, n), -1),
    )
    profile_day = np.where(fraud == 1, attack - 1 - rng.integers(1, 3, n), -1)
    confirm = np.where(
        fraud > 0, attack + rng.integers(CONFIRM_DELAY[0], CONFIRM_DELAY[1] + 1, n), -1
    )
    segment = income <= 1

    # Shocks (job loss, a large bill) arrive as a Poisson process; the shift adds a macro shock
    # for the segment and raises its shock rate. Drawn from their own stream so a shift of
    # strength 0 leaves every other draw, and so the world, unchanged.
    shock_rng = _rng(config, -1, 1)
    counts = shock_rng.poisson(config.stress_shocks_per_year * days / 365, n)
    users, when = np.repeat(np.arange(n), counts), shock_rng.integers(0, days, counts.sum())
    size = shock_rng.exponential(1.2, counts.sum())
    k, sd = config.shift_strength, config.shift_day
    if sd is not None and k > 0 and sd < days:
        seg = np.flatnonzero(segment)
        extra = shock_rng.poisson(
            1.5 * k * config.stress_shocks_per_year * (days - sd) / 365, seg.size
        )
        extra_users = np.concatenate([seg, np.repeat(seg, extra)])
        users = np.concatenate([users, extra_users])
        when = np.concatenate(
            [when, np.full(seg.size, sd), shock_rng.integers(sd, days, extra.sum())]
        )
        size = np.concatenate(
            [size, np.full(seg.size, 1.2 * k), shock_rng.exponential(1.2, extra.sum())]
        )
    order = np.lexsort((users, when))
    return _Population(
        signup_day=signup_day,
        region=rng.choice(5, n, p=[0.22, 0.24, 0.18, 0.2, 0.16]),
        age_band=age,
        income_band=income,
        creditworthiness=cw,
        bureau_score=cw + rng.normal(0, 0.6, n),
        session_rate=config.sessions_per_day * rng.lognormal(-0.125, 0.5, n),
        application_rate=np.where(
            fraud == 2, 0.0, config.applications_per_day * rng.gamma(1.5, 1 / 1.5, n)
        ),
        channel=rng.choice(3, n, p=[0.35, 0.5, 0.15]),
        fraud_type=fraud,
        profile_day=profile_day,
        device_day=np.where(fraud > 0, attack - 1, -1),
        attack_day=attack,
        confirm_day=confirm,
        shift_segment=segment,
        shock_user=users[order],
        shock_day=when[order],
        shock_size=size[order],
    )


def hidden_users(config: WorldConfig) -> pl.DataFrame:
    """The truth behind each entity, for tests and analysis; never a feature. Days are world
    days; `fraud_start_day` is the first day of the attack's application run, and the stress
    shocks include the regime shift's macro shock for `in_shift_segment`."""
    pop = _population(config)
    n = config.n_users
    n_shocks = np.bincount(pop.shock_user, minlength=n)
    first_shock = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first_shock, pop.shock_user, pop.shock_day)

    return pl.DataFrame(
        {
            "entity_id": _entity_ids(np.arange(n)),
            "signup_day": pop.signup_day,
            "region": np.array(REGIONS)[pop.region],
            "age_band": np.array(AGE_BANDS)[pop.age_band],
            "income_band": np.array(INCOME_BANDS)[pop.income_band],
            "creditworthiness": pop.creditworthiness,
            "bureau_score": pop.bureau_score,
            "fraud_type": np.array(FRAUD_TYPES)[pop.fraud_type],
            "fraud_start_day": _nullable(pop.attack_day),
            "fraud_confirm_day": _nullable(pop.confirm_day),
            "in_shift_segment": pop.shift_segment,
            "n_stress_shocks": n_shocks,
            "first_shock_day": _nullable(np.where(n_shocks > 0, first_shock, -1)),
        }
    )
