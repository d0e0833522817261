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
its label *as the spec defines it* (any `delinquency_60` / `fraud_confirmed` of the entity in
(ts, ts + horizon]) given what the simulator knows at that moment. A loan's default
probability is fixed at checkout and drawn on its first due date; a default is 60 days past
that date. So an application's window either already holds a drawn delinquency (p = 1), or
its p combines the loans booked so far (earlier ones not yet drawn, and the day's own) that
would land in it. Later loans must not change an earlier label: a loan whose delinquency would
fall in the window of an earlier approval defaults one installment later instead. Fraud is
confirmed a random 15-70 days after the attack starts, so p_fraud is that delay's chance of
landing in the window. Delinquencies and fraud confirmations are posted by a nightly batch
(00:00-01:00 UTC) while people act from 01:00, so windows are whole days: (day, day + horizon].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from eventml.pack import DatasetPack

# The pack is the source of the vocabularies; the simulator's codes are their positions.
PACK = DatasetPack.from_yaml(Path(__file__).with_name("pack.yaml"))
EVENT_TYPES = PACK.event_types
(
    SIGNUP,
    SESSION,
    APPLICATION,
    ON_TIME,
    LATE,
    MISSED,
    DELINQUENCY,
    PROFILE_CHANGE,
    DEVICE_CHANGE,
    CHARGEBACK,
    FRAUD_CONFIRMED,
) = range(len(EVENT_TYPES))

CHANNELS = PACK.categories["channel"]
MERCHANTS = PACK.categories["merchant_category"]
# Per merchant category, in the pack's order.
MERCHANT_MEDIAN_AMOUNT = np.array([450, 120, 700, 60, 90, 200, 70, 150, 900, 600, 150, 400.0])
MERCHANT_WEIGHT = np.array([10, 16, 6, 14, 8, 10, 9, 7, 4, 3, 7, 6.0])
# Big-ticket categories the post-shift economy leans towards (financing what cash can't cover).
SHIFT_MERCHANTS = np.isin(MERCHANTS, ("electronics", "travel", "gaming"))
# What fraudsters buy: big tickets that resell.
FRAUD_MERCHANTS = np.flatnonzero(
    np.isin(MERCHANTS, ("electronics", "travel", "jewelry", "furniture"))
)
POLICY_DECISIONS = PACK.categories["policy_decision"]
PROFILE_FIELDS = PACK.categories["profile_field"]
REGIONS = PACK.categories["region"]
AGE_BANDS = PACK.categories["age_band"]
INCOME_BANDS = PACK.categories["income_band"]
INCOME_AMOUNT_FACTOR = np.array([0.6, 0.8, 1.0, 1.3, 1.7])
TERMS = np.array([1.0, 3.0, 6.0, 12.0])
FRAUD_TYPES = ("none", "bust_out", "stolen_identity")

DEFAULT_HORIZON = PACK.label("default_90d").horizon_days
FRAUD_HORIZON = PACK.label("fraud_60d").horizon_days
FIRST_DUE = (14, 30)  # first installment due this many days after checkout (the user's pay date)
CONFIRM_DELAY = (15, 70)  # attack start -> fraud_confirmed; shorter than any delinquency (>= 74)
ATTACK_DAYS = 4  # a fraud attack applies on this many consecutive days
NIGHT_US, DAY_US = 3_600_000_000, 86_400_000_000  # the nightly batch owns 00:00-01:00 UTC


@dataclass(frozen=True)
class WorldConfig:
    """One world. The defaults are the reference world (~2.4M events); tests shrink it."""

    n_users: int = 20_000
    n_days: int = 365
    start: str = "2025-01-01"  # day 0, midnight UTC
    seed: int = 7
    # Day 300 (late October): after the last matured test label (day 275), so out-of-time
    # evaluation judges a stable world and the shift is what monitoring must catch live.
    shift_day: int | None = 300  # regime shift from this day on; None = never
    # 0 = a shift that changes nothing. At 3 the hit segment's applications roughly triple
    # within a week (a macro shock, not a wobble): on the reference world the default score's
    # PSI reaches 0.22 five days in and 0.5 ten days in (0.03 at most before it), which is
    # what monitoring is there to catch; at 1 it stays under 0.09.
    shift_strength: float = 3.0
    initial_cohort: float = 0.4  # share of users already signed up in the first weeks
    initial_cohort_days: int = 21  # the rest sign up uniformly over the whole span
    bust_out_rate: float = 0.01
    stolen_identity_rate: float = 0.005
    sessions_per_day: float = 0.35
    applications_per_day: float = 0.03
    attack_applications_per_day: float = 2.0
    stress_shocks_per_year: float = 1.0
    stress_persistence: float = 0.97  # AR(1) coefficient: a shock's effect halves in ~3 weeks
    profile_changes_per_year: float = 0.5
    device_changes_per_year: float = 0.7
    # Intercepts of the incumbent policy's scorecard and of a loan's true default logit; the
    # defaults give ~60% approval and ~5-6% default_90d among approved loans.
    approval_base_logit: float = 4.4
    default_base_logit: float = -4.5

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_days < 1:
            raise ValueError(f"WorldConfig needs n_users >= 1 and n_days >= 1, got {self}")
        for name in (
            "initial_cohort",
            "bust_out_rate",
            "stolen_identity_rate",
            "stress_persistence",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.shift_strength < 0:
            raise ValueError(f"WorldConfig.shift_strength must be >= 0, got {self.shift_strength}")
        if self.bust_out_rate + self.stolen_identity_rate > 1:
            raise ValueError("WorldConfig: bust_out_rate + stolen_identity_rate must be <= 1")
        try:
            date.fromisoformat(self.start)
        except ValueError:
            raise ValueError(
                f"WorldConfig.start must be an ISO date like '2025-01-01', got {self.start!r}"
            ) from None

    def shift_at(self, day: int) -> float:
        """The regime shift's strength in effect on `day` (0 before it or without one)."""
        return self.shift_strength if self.shift_day is not None and day >= self.shift_day else 0.0


def _rng(config: WorldConfig, day: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, 1 + day, stream])  # day -1: the population


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------ population


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


# ------------------------------------------------------------------------------- the world

# Columns of an event chunk (one array per column) and what a chunk leaves out: -1 / NaN = null.
_CHUNK_FILL = {
    "amount": np.nan,
    "channel": -1,
    "device": -1,
    "merchant": -1,
    "policy": -1,
    "profile": -1,
    "term": np.nan,
    "days_late": np.nan,
    "p_default": np.nan,
    "p_fraud": np.nan,
}


def _chunk(
    user: np.ndarray, etype: int, tod: np.ndarray, **cols: np.ndarray
) -> dict[str, np.ndarray]:
    return {"user": user, "etype": np.full(user.size, etype, np.int8), "tod": tod, **cols}


def _schedule(
    store: dict[int, list[dict]],
    days: np.ndarray,
    chunk: dict[str, np.ndarray],
    horizon: int | None = None,
) -> None:
    """File the rows of `chunk` under their `days`; those on or after `horizon` are dropped."""
    order = np.argsort(days, kind="stable")
    days = days[order]
    keep = days < (horizon if horizon is not None else np.iinfo(np.int64).max)
    days, order = days[keep], order[keep]
    if not days.size:
        return
    uniq, starts = np.unique(days, return_index=True)
    for day, rows in zip(uniq.tolist(), np.split(order, starts[1:]), strict=True):
        store.setdefault(day, []).append({k: v[rows] for k, v in chunk.items()})


class _World:
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
        # The oracle's bookkeeping (see the module doc): no new delinquency may land on or before
        # `clean_until`; `pending_*` are the delinquencies drawn and not yet emitted.
        self.clean_until = np.full(n, -1, np.int64)
        self.pending_user, self.pending_day = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.booked: dict[int, list[dict]] = {}  # loans waiting for their first due date
        self.due: dict[int, list[dict]] = {}  # installments to settle on their due day
        self.outbox: dict[int, list[dict]] = {}  # events decided earlier, emitted on their day
        self.start_us = int(
            datetime.fromisoformat(config.start).replace(tzinfo=UTC).timestamp() * 1e6
        )

    def step(self, day: int) -> pl.DataFrame:
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
        return self._frame(day, chunks)

    def _settle_installments(self, day: int, rng: np.random.Generator) -> None:
        """Decide today's due installments; the outcome is emitted when it is known."""
        c = _concat(self.due.pop(day, []))
        if c is None:
            return
        live = ~self.closed[c["user"]]
        c = {k: v[live] for k, v in c.items()}
        u, n = c["user"], c["user"].size
        np.subtract.at(self.open_loans, u[c["last"]], 1)
        cw, s = self.pop.creditworthiness[u], self.pressure[u]
        # A defaulting loan misses every installment from its first missed one; an attack loan pays none.
        forced = c["attack"] | ((c["default_k"] >= 0) & (c["k"] >= c["default_k"]))
        p_late = _sigmoid(-2.2 - 0.5 * cw + 1.3 * s)
        p_miss = _sigmoid(-4.5 - 0.6 * cw + 1.5 * s)  # missed, but cured before 60 days
        draw = rng.random(n)
        outcome = np.where(
            forced | (draw < p_miss), MISSED, np.where(draw < p_miss + p_late, LATE, ON_TIME)
        )
        late_days = np.minimum(29, 1 + rng.poisson(3 + 4 * np.maximum(s, 0)))
        days_late = np.select([outcome == MISSED, outcome == LATE], [30, late_days], 0)
        tod = rng.integers(NIGHT_US, DAY_US, n)
        for etype in (ON_TIME, LATE, MISSED):
            m = outcome == etype
            chunk = _chunk(
                u[m], etype, tod[m], amount=c["amount"][m], days_late=days_late[m].astype(float)
            )
            _schedule(self.outbox, day + days_late[m], chunk, self.cfg.n_days)

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

    def _apply(self, day: int, active: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """Checkouts, the incumbent policy's decisions, and the loans they book."""
        cfg, pop, n = self.cfg, self.pop, self.cfg.n_users
        k = cfg.shift_at(day)
        since_attack = day - pop.attack_day
        attacking = (
            (pop.attack_day >= 0) & (since_attack >= 0) & (since_attack < ATTACK_DAYS) & active
        )
        rate = (
            pop.application_rate * np.exp(0.5 * self.pressure) * (1 + 0.3 * k * pop.shift_segment)
        )
        rate = np.where(attacking, cfg.attack_applications_per_day, rate)
        n_app = rng.poisson(rate) * active + (attacking & (since_attack == 0))
        user = np.repeat(np.arange(n), n_app)
        m = user.size
        # Order each person's checkouts in time, so the policy sees the earlier ones of the day.
        tod = self._tod(user, rng)
        order = np.lexsort((tod, user))
        user, tod = user[order], tod[order]
        rank = np.arange(m) - np.repeat(np.cumsum(n_app) - n_app, n_app)
        attack = attacking[user]

        weights = MERCHANT_WEIGHT * (1 + 0.8 * k * SHIFT_MERCHANTS)
        merchant = np.where(
            attack,
            rng.choice(FRAUD_MERCHANTS, m),
            rng.choice(len(MERCHANTS), m, p=weights / weights.sum()),
        )
        amount = (
            MERCHANT_MEDIAN_AMOUNT[merchant]
            * INCOME_AMOUNT_FACTOR[pop.income_band[user]]
            * rng.lognormal(0, 0.5, m)
            * np.where(attack, 2.5, 1.0)
        ).round(2)
        # Bigger baskets are spread over longer terms.
        size = np.digitize(amount, [100, 500])
        term_cdf = np.array([[0.6, 0.9, 1.0, 1.0], [0.2, 0.6, 0.9, 1.0], [0.05, 0.3, 0.65, 1.0]])[
            size
        ]
        term_idx = (rng.random(m)[:, None] > term_cdf).sum(1)
        log_amount = np.log(amount / 200)

        # The incumbent policy: a scorecard on what the lender can see, plus judgement noise.
        tenure = np.minimum((day - pop.signup_day[user]) / 60, 1)
        approve_logit = (
            cfg.approval_base_logit
            + 1.3 * pop.bureau_score[user]
            - 1.5 * self.late_score[user]
            - 3.0 * (self.delinquencies[user] > 0)
            - 0.6 * (self.velocity[user] + rank)
            - 1.0 * self.open_loans[user]
            - 0.5 * log_amount
            + 0.4 * tenure
            + rng.normal(0, 0.8, m)
        )
        approved = rng.random(m) < _sigmoid(approve_logit)

        # The truth: each loan's default probability, from hidden creditworthiness and stress now.
        cw, s = pop.creditworthiness[user], self.pressure[user]
        p_loan = _sigmoid(
            cfg.default_base_logit
            + 0.5 * k
            - 0.8 * cw
            + 1.0 * s
            + 0.3 * log_amount
            + 0.12 * term_idx
        )
        p_loan = np.where(pop.fraud_type[user] > 0, 0.0, p_loan)
        first_due = day + rng.integers(FIRST_DUE[0], FIRST_DUE[1] + 1, m)
        # A default may not land in the window of an earlier approval: it slips one installment
        # (a term-1 plan has none to slip to and cannot default).
        in_time = first_due + 60 > self.clean_until[user]
        default_k = np.select([in_time, term_idx > 0], [0, 1], -1)
        p_loan = np.where(default_k >= 0, p_loan, 0.0)

        # The label is 1 if a delinquency already scheduled lands in the window, or if a loan not
        # yet settled (booked earlier, or today: same-day checkouts share the window) lands in it.
        future = self.pending_day > day
        self.pending_user, self.pending_day = self.pending_user[future], self.pending_day[future]
        next_delinquency = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(next_delinquency, self.pending_user, self.pending_day)
        own = np.log1p(-p_loan * (default_k == 0))
        log_clear = np.bincount(user, own * approved, minlength=n).astype(float)
        if unsettled := _concat([c for chunks in self.booked.values() for c in chunks]):
            lands = (unsettled["default_k"] >= 0) & (unsettled["landing"] <= day + DEFAULT_HORIZON)
            np.add.at(log_clear, unsettled["user"], np.log1p(-unsettled["p"]) * lands)
        p_default = np.where(
            next_delinquency[user] <= day + DEFAULT_HORIZON,
            1.0,
            -np.expm1(log_clear[user] + np.where(approved, 0.0, own)),
        )
        self.clean_until[np.bincount(user, approved, minlength=n) > 0] = day + DEFAULT_HORIZON

        # Fraud is confirmed CONFIRM_DELAY after the attack starts, whoever approved what.
        lo = np.maximum(CONFIRM_DELAY[0], day - pop.attack_day[user] + 1)
        hi = np.minimum(CONFIRM_DELAY[1], day - pop.attack_day[user] + FRAUD_HORIZON)
        span = CONFIRM_DELAY[1] - CONFIRM_DELAY[0] + 1
        p_fraud = np.where(pop.fraud_type[user] > 0, np.maximum(hi - lo + 1, 0) / span, 0.0)

        book = {
            "user": user,
            "amount": amount,
            "term_idx": term_idx,
            "p": p_loan,
            "default_k": default_k,
            "landing": first_due + 30 * default_k + 60,
            "attack": attack,
        }
        self._book(day, first_due[approved], {col: v[approved] for col, v in book.items()}, rng)
        self.velocity = 0.85 * self.velocity + np.bincount(user, minlength=n)
        device = self.device_before[user] + (tod >= self.change_tod[user])
        channel = np.where(
            attack, rng.integers(0, 2, m), self._channel(user, rng)
        )  # fraud is remote
        return [
            _chunk(
                user,
                APPLICATION,
                tod,
                amount=amount,
                channel=channel,
                device=user * 1000 + device,
                merchant=merchant,
                policy=np.where(approved, 0, 1),
                term=TERMS[term_idx],
                p_default=p_default,
                p_fraud=p_fraud,
            )
        ]

    def _book(self, day: int, first_due: np.ndarray, loans: dict, rng: np.random.Generator) -> None:
        """File booked loans until their first due date, and draw any chargeback."""
        _schedule(self.booked, first_due, loans)
        np.add.at(self.open_loans, loans["user"], 1)
        # Disputes: rare for real customers, common when the identity's owner sees the bill.
        user, attack = loans["user"], loans["attack"]
        cb = rng.random(user.size) < np.where(attack, 0.35, 0.004)
        tod = rng.integers(NIGHT_US, DAY_US, cb.sum())
        chunk = _chunk(user[cb], CHARGEBACK, tod, amount=loans["amount"][cb])
        _schedule(self.outbox, day + rng.integers(5, 31, user.size)[cb], chunk, self.cfg.n_days)

    def _settle_loans(self, day: int, rng: np.random.Generator) -> None:
        """On a loan's first due date its default is drawn, with the probability fixed at checkout;
        its installments and, for a default, its delinquency are scheduled."""
        loans = _concat(self.booked.pop(day, []))
        if loans is None:
            return
        horizon = self.cfg.n_days
        default_k = np.where(rng.random(loans["user"].size) < loans["p"], loans["default_k"], -1)
        terms = TERMS[loans["term_idx"]].astype(int)
        loan = np.repeat(np.arange(terms.size), terms)
        kth = np.arange(loan.size) - np.repeat(np.cumsum(terms) - terms, terms)
        _schedule(
            self.due,
            day + 30 * kth,
            {
                "user": loans["user"][loan],
                "amount": (loans["amount"] / terms)[loan].round(2),
                "k": kth,
                "default_k": default_k[loan],
                "attack": loans["attack"][loan],
                "last": kth == terms[loan] - 1,
            },
            horizon,
        )
        # 60 days past the first missed due date. (Attack loans never pay, but are confirmed as
        # fraud, and the account shut, before they could reach 60 days.)
        late = default_k >= 0
        user, when = loans["user"][late], loans["landing"][late]
        self.pending_user = np.concatenate([self.pending_user, user])
        self.pending_day = np.concatenate([self.pending_day, when])
        chunk = _chunk(
            user, DELINQUENCY, rng.integers(0, NIGHT_US, user.size), amount=loans["amount"][late]
        )
        _schedule(self.outbox, when, chunk, horizon)

    def _frame(self, day: int, chunks: list[dict]) -> pl.DataFrame:
        cols = {}
        for name in ("user", "etype", "tod", *_CHUNK_FILL):
            fill = _CHUNK_FILL.get(name)
            cols[name] = np.concatenate(
                [c[name] if name in c else np.full(c["user"].size, fill) for c in chunks]
            )
        order = np.lexsort((np.arange(cols["tod"].size), cols["tod"]))
        cols = {k: v[order] for k, v in cols.items()}
        pop, user = self.pop, cols["user"]
        signup = cols["etype"] == SIGNUP
        static = {
            name: np.where(signup, codes[user], -1)
            for name, codes in (
                ("region", pop.region),
                ("age_band", pop.age_band),
                ("income_band", pop.income_band),
            )
        }
        ts = pl.Series(self.start_us + day * DAY_US + cols["tod"]).cast(pl.Datetime("us"))
        event_no = pl.int_range(user.size)  # ids follow time order: sorting by ts sorts by id too
        frame = pl.DataFrame(
            {
                "entity_id": _entity_ids(user),
                "event_id": pl.select(
                    f"e{day:04d}-" + event_no.cast(pl.String).str.zfill(7)
                ).to_series(),
                "ts": ts.dt.replace_time_zone("UTC"),
                "event_type": _decode(EVENT_TYPES, cols["etype"]),
                "amount": pl.Series(cols["amount"], nan_to_null=True),
                "channel": _decode(CHANNELS, cols["channel"]),
                "device_id": pl.select(
                    "d" + pl.lit(_nullable(cols["device"])).cast(pl.String).str.zfill(10)
                ).to_series(),
                "merchant_category": _decode(MERCHANTS, cols["merchant"]),
                "policy_decision": _decode(POLICY_DECISIONS, cols["policy"]),
                "profile_field": _decode(PROFILE_FIELDS, cols["profile"]),
                "region": _decode(REGIONS, static["region"]),
                "age_band": _decode(AGE_BANDS, static["age_band"]),
                "income_band": _decode(INCOME_BANDS, static["income_band"]),
                **{
                    c: pl.Series(cols[k], nan_to_null=True)
                    for c, k in (
                        ("term_months", "term"),
                        ("days_late", "days_late"),
                        ("true_p_default", "p_default"),
                        ("true_p_fraud", "p_fraud"),
                    )
                },
            }
        )
        self._observe(cols)
        return frame.cast(PACK.event_schema())

    def _observe(self, cols: dict[str, np.ndarray]) -> None:
        """Refresh what the incumbent policy knows from what was emitted today."""
        n = self.cfg.n_users
        weight = np.select([cols["etype"] == LATE, cols["etype"] == MISSED], [0.5, 1.5], 0.0)
        self.late_score = 0.98 * self.late_score + np.bincount(cols["user"], weight, minlength=n)
        self.delinquencies += np.bincount(cols["user"], cols["etype"] == DELINQUENCY, minlength=n)


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Chunks with the same columns as one chunk; None when there are none."""
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else None


def _entity_ids(user: np.ndarray) -> pl.Series:
    return pl.select("u" + pl.lit(pl.Series(user)).cast(pl.String).str.zfill(7)).to_series()


def _nullable(codes: np.ndarray) -> pl.Series:
    """An integer Series in which negative codes are null."""
    idx = pl.Series(codes.astype(np.int64))
    return pl.select(pl.when(idx >= 0).then(idx)).to_series()


def _decode(names: tuple[str, ...], codes: np.ndarray) -> pl.Series:
    """Category names for integer codes; -1 is null."""
    return pl.Series(names, dtype=pl.String).gather(_nullable(codes))


# ------------------------------------------------------------------------------ public API


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
        frame = world.step(day)
        if day >= days.start:
            yield day, frame


def simulate(config: WorldConfig, days: range | None = None) -> pl.DataFrame:
    """Events of `days` (default: all), sorted by (ts, event_id), in `PACK`'s schema."""
    frames = [frame for _, frame in iter_days(config, days)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=PACK.event_schema())


def simulate_day(config: WorldConfig, day: int) -> pl.DataFrame:
    return simulate(config, range(day, day + 1))
