"""The lender's side of the daily step: checkouts, the incumbent policy's decisions, the loans
they book, their chargebacks, installments and defaults, and the oracle's probabilities.

Kept apart from what people do besides borrowing (`world`) so that the oracle, which these steps
keep, reads as a whole.

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

import numpy as np

from eventml.worlds.lending.config import (
    APPLICATION,
    ATTACK_DAYS,
    CHARGEBACK,
    CONFIRM_DELAY,
    DAY_US,
    DEFAULT_HORIZON,
    DELINQUENCY,
    FIRST_DUE,
    FRAUD_HORIZON,
    FRAUD_MERCHANTS,
    INCOME_AMOUNT_FACTOR,
    LATE,
    MERCHANT_MEDIAN_AMOUNT,
    MERCHANT_WEIGHT,
    MERCHANTS,
    MISSED,
    NIGHT_US,
    ON_TIME,
    SHIFT_MERCHANTS,
    TERMS,
    _sigmoid,
)
from eventml.worlds.lending.events import _chunk, _concat, _schedule


class _Loans:
    """The credit half of `_World` (mixed into it): these steps read and update its state, and
    draw people's times of day and channels through its `_tod` and `_channel`."""

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
