"""The synthetic card world: cards, the merchants and terminals they pay at, and the fraud that
only order and timing reveal.

Every payment is a decision. A cardholder pays mostly at a few favourite merchants, in person
(card present) or online (card not present), and away from them often online at shops never
used before (each holder has their own share); and pays in a daily rhythm of their own (most in
the daytime, some in the evening, a few at night, each within an hour or two of their centre).
Attackers keep their own hours, which are some other holder's: the hour of a payment says
nothing by itself, only against the card's own history. Three kinds of fraud are planted, each
visible only in the sequence of events, not in one payment:
- **compromised terminals**: a physical terminal is skimmed for a week; a card that pays there is
  copied with some chance, and days later the copy spends online, at everyday online shops and
  for everyday amounts, out of the holder's rhythm;
- **card testing**: a burst of tiny online payments at digital-goods merchants, then a large one;
- **account takeover**: a profile change (email, phone), then large online payments within hours.
A holder's region and age band are not in the feed but in the `holders` reference table (a row
from the day the card is issued, a new region when the holder moves: `references`).
Fraud is a column on the payment (`is_fraud`), confirmed within the pack's 14-day horizon and
followed by a chargeback, so it matures within days: delayed-label monitoring can act inside
the world's span. A shift (`shift_day`, `shift_strength`) is a counterfeit ring arriving: the
attack rates are multiplied, and from that day skimmed cards are cloned onto plastic and spent in
person at physical shops instead of online. A model that learned "card present is safe" ranks
those payments low: the decay the performance sensor is there to catch, which only labels of
post-shift payments show.

The oracle: each payment records `true_p_fraud`, the probability with which the simulator drew
its `is_fraud` (a holder's own payment has a small base rate; an attacker's is nearly always
reported).

Determinism and streaming, as the lending world: the world is a state stepped one day at a time;
each day draws only from `default_rng([seed, 1 + day, stream])`, and events that happen on a
later day (an attack after a skim, a chargeback) are scheduled into the state and emitted on
their day, so a day computed alone equals the same day of the bulk run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from eventml.pack import DatasetPack
from eventml.references import attach
from eventml.worlds.cards.chunks import _chunk, _concat, _decode, _ids

PACK = DatasetPack.from_yaml(Path(__file__).with_name("pack.yaml"))
EVENT_TYPES = PACK.event_types
ISSUED, PAYMENT, PROFILE_CHANGE, CHARGEBACK = range(len(EVENT_TYPES))
CHANNELS = PACK.categories["channel"]
CARD_PRESENT, NOT_PRESENT = range(len(CHANNELS))
MCCS = PACK.categories["mcc"]
# Per merchant category, in the pack's order: a typical ticket and how many merchants there are.
MCC_MEDIAN = np.array([35, 45, 30, 12, 60, 400, 350, 8.0])
MCC_WEIGHT = np.array([30, 12, 20, 10, 14, 3, 3, 8.0])
ONLINE = np.isin(MCCS, ("online_retail", "digital_goods"))  # card-not-present merchants
ATTACK_MCCS = np.flatnonzero(np.isin(MCCS, ("electronics", "online_retail", "digital_goods")))
# Where counterfeit copies are spent in person: everyday shops, where card-present payments at an
# unfamiliar merchant are common, at a few times the usual ticket.
COUNTERFEIT_MCCS = np.flatnonzero(np.isin(MCCS, ("grocery", "fuel", "restaurant")))
TESTING_MCC = MCCS.index("digital_goods")
ONLINE_MCCS = np.flatnonzero(ONLINE)
PROFILE_FIELDS = PACK.categories["profile_field"]
ADDRESS = PROFILE_FIELDS.index("address")
REGIONS = PACK.categories["region"]
AGE_BANDS = PACK.categories["age_band"]

US_PER_HOUR, US_PER_DAY = 3_600_000_000, 86_400_000_000
_UNIX_DAY = date(1970, 1, 1).toordinal()
BASE_FRAUD = 0.0008  # a holder's own payment is reported as fraud this often (x3 online)
ATTACK_FRAUD = 0.92  # an attacker's payment is reported this often
CHARGEBACK_DAYS = (3, 13)  # after a reported fraud; the label's horizon covers it
# Daily rhythms, (share of holders, centre hour, spread of the centres): most pay in the daytime,
# some in the evening, a few at night; each holder within an hour or two of their own centre.
RHYTHMS = ((0.55, 13.0, 2.5), (0.30, 19.5, 1.5), (0.15, 2.0, 2.0))


@dataclass(frozen=True)
class WorldConfig:
    """One world. The defaults are the reference world (~245,000 events, a counterfeit ring from
    day 130); tests shrink it."""

    n_users: int = 1_000  # cards, one holder each
    n_days: int = 365
    start: str = "2025-01-01"  # day 0, midnight UTC
    seed: int = 11
    n_merchants: int = 400
    payments_per_day: float = 0.8
    favourite_share: float = 0.75  # of payments at one of a holder's five favourite merchants
    # Of a holder's payments away from their favourites, the share online (on average: each
    # holder has their own), so paying online at a shop never used before is nothing unusual.
    online_share: float = 0.4
    compromised_terminals_per_day: float = 0.5
    compromise_days: int = 7
    skim_probability: float = 0.3  # a card paying at a compromised terminal is copied
    testing_rate: float = 0.0006  # per card and day: a card-testing attack
    takeover_rate: float = 0.0004  # per card and day: an account takeover
    profile_changes_per_year: float = 0.6  # the holders' own
    # From this day attack rates are multiplied by shift_strength, and skimmed copies spend in
    # person (counterfeit cards) rather than online.
    shift_day: int | None = 130
    shift_strength: float = 3.0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_days < 1 or self.n_merchants < len(MCCS):
            raise ValueError(
                f"WorldConfig needs n_users >= 1, n_days >= 1 and n_merchants >= {len(MCCS)}"
            )
        date.fromisoformat(self.start)

    def shifted(self, day: int) -> bool:
        return self.shift_day is not None and day >= self.shift_day

    def attack_factor(self, day: int) -> float:
        return self.shift_strength if self.shifted(day) else 1.0


def _rng(config: WorldConfig, day: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, 1 + day, stream])  # day -1: the population


class _World:
    def __init__(self, config: WorldConfig):
        self.cfg = c = config
        rng = _rng(c, -1, 0)
        n = c.n_users
        early = rng.random(n) < 0.6
        self.issue_day = np.where(
            early, rng.integers(0, min(14, c.n_days), n), rng.integers(0, c.n_days, n)
        )
        self.region = rng.integers(0, len(REGIONS), n)
        self.age_band = rng.choice(len(AGE_BANDS), n, p=[0.2, 0.3, 0.35, 0.15])
        self.profiles: list[tuple[np.ndarray, ...]] = [(np.zeros(0, np.int64),) * 4]
        self.rate = c.payments_per_day * rng.gamma(2.0, 0.5, n)
        self.mcc = rng.choice(len(MCCS), c.n_merchants, p=MCC_WEIGHT / MCC_WEIGHT.sum())
        self.mcc[: len(MCCS)] = np.arange(len(MCCS))  # every category has a merchant
        # Physical merchants have 1-3 terminals, online ones one virtual terminal.
        per = np.where(ONLINE[self.mcc], 1, rng.integers(1, 4, c.n_merchants))
        self.terminal_merchant = np.repeat(np.arange(c.n_merchants), per)
        self.first_terminal = np.concatenate([[0], np.cumsum(per)[:-1]])
        self.n_terminals = per
        self.physical = np.flatnonzero(~ONLINE[self.mcc[self.terminal_merchant]])
        self.favourites = rng.choice(c.n_merchants, (n, 5))
        self.compromised_until = np.full(self.terminal_merchant.size, -1)
        self.pending: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        rng = _rng(c, -1, 1)
        share, centre, spread = (np.array(x) for x in zip(*RHYTHMS, strict=True))
        kind = rng.choice(len(RHYTHMS), n, p=share)
        self.hour_centre = (centre[kind] + spread[kind] * rng.standard_normal(n)) % 24
        self.hour_spread = rng.uniform(0.75, 1.75, n)
        self.favourite_share = np.clip(rng.normal(c.favourite_share, 0.12, n), 0.4, 0.95)
        self.online_share = rng.beta(5 * c.online_share, 5 * (1 - c.online_share), n)
        self.online_merchants = np.flatnonzero(ONLINE[self.mcc])
        self.physical_merchants = np.flatnonzero(~ONLINE[self.mcc])

    def _clock(self, rng, cards: np.ndarray, day: int) -> np.ndarray:
        """Times on `day` in the daily rhythm of each of `cards`."""
        hour = self.hour_centre[cards] + self.hour_spread[cards] * rng.standard_normal(cards.size)
        return day * US_PER_DAY + ((hour % 24) * US_PER_HOUR).astype(np.int64)

    def _attacker_clock(self, rng, days: np.ndarray) -> np.ndarray:
        """Sorted times on `days` in one attacker's rhythm: some holder's, not the card's own, so
        the hour alone says nothing and only the card's history shows it is out of place."""
        attacker = np.full(days.size, rng.integers(0, self.hour_centre.size))
        return np.sort(self._clock(rng, attacker, 0) + days * US_PER_DAY)

    # ------------------------------------------------------------ the day's events

    def _at(self, rng, merchants: np.ndarray) -> np.ndarray:
        """A terminal of each merchant."""
        pick = (rng.random(merchants.size) * self.n_terminals[merchants]).astype(np.int64)
        return self.first_terminal[merchants] + pick

    def _attack(self, rng, cards, ts, amounts) -> dict[str, np.ndarray]:
        """Online payments by attackers at merchants of the attack categories."""
        mcc = ATTACK_MCCS[rng.integers(0, ATTACK_MCCS.size, cards.size)]
        return self._payments(rng, cards, ts, amounts, mcc, ATTACK_FRAUD, online=True)

    def _payments(self, rng, cards, ts, amounts, mcc, p, online=False, merchants=None):
        """Payments at `merchants` (or a random merchant of each `mcc`), reported as fraud with
        probability `p`; a holder's own (p = BASE_FRAUD) three times as often online."""
        if merchants is None:  # a random merchant of each payment's category
            by_mcc = [np.flatnonzero(self.mcc == m) for m in range(len(MCCS))]
            merchants = np.array([by_mcc[m][rng.integers(0, by_mcc[m].size)] for m in mcc], int)
        mcc = self.mcc[merchants]
        channel = np.where(online | ONLINE[mcc], NOT_PRESENT, CARD_PRESENT)
        p = (
            np.where(channel == NOT_PRESENT, 3 * p, p)
            if p == BASE_FRAUD
            else np.full(cards.size, p)
        )
        return _chunk(cards.size, card=cards, ts=ts, etype=PAYMENT, amount=np.round(amounts, 2),
                      channel=channel, mcc=mcc, merchant=merchants,
                      terminal=self._at(rng, merchants), fraud=(rng.random(cards.size) < p), p=p)  # fmt: skip

    def step(self, day: int) -> list[dict[str, np.ndarray]]:
        c, t0 = self.cfg, day * US_PER_DAY
        active = np.flatnonzero(self.issue_day <= day)
        attack = c.attack_factor(day)
        self.day, self.chunks = day, self.pending.pop(day, [])
        chunks = self.chunks

        issued = np.flatnonzero(self.issue_day == day)
        r = _rng(c, day, 1)
        at = t0 + r.integers(6 * US_PER_HOUR, 22 * US_PER_HOUR, issued.size)
        chunks.append(_chunk(issued.size, card=issued, etype=ISSUED, ts=at))
        self._profile(issued, np.full(issued.size, t0))  # the account holds from the day's start

        # The holders' own payments, mostly at their favourite merchants, by day.
        r = _rng(c, day, 2)
        count = r.poisson(self.rate[active])
        cards = np.repeat(active, count)
        fav = r.random(cards.size) < self.favourite_share[cards]
        online = r.random(cards.size) < self.online_share[cards]
        elsewhere = np.where(
            online,
            self.online_merchants[r.integers(0, self.online_merchants.size, cards.size)],
            self.physical_merchants[r.integers(0, self.physical_merchants.size, cards.size)],
        )
        merchants = np.where(fav, self.favourites[cards, r.integers(0, 5, cards.size)], elsewhere)
        amounts = r.lognormal(np.log(MCC_MEDIAN[self.mcc[merchants]]), 0.7)
        ts = self._clock(r, cards, day)
        own = self._payments(r, cards, ts, amounts, None, BASE_FRAUD, merchants=merchants)
        chunks.append(own)

        # Compromised terminals copy some of the cards that pay there; the copies spend later.
        r = _rng(c, day, 3)
        hit = r.choice(self.physical, r.poisson(c.compromised_terminals_per_day * attack))
        self.compromised_until[hit] = day + c.compromise_days
        skimmed = (self.compromised_until[own["terminal"]] >= day) & (
            own["channel"] == CARD_PRESENT
        )
        skimmed &= r.random(skimmed.size) < c.skim_probability
        for card in np.unique(own["card"][skimmed]):
            # Cashed out over a few days, until the card is blocked.
            later, k = day + int(r.integers(2, 11)), int(r.integers(2, 7))
            ts = self._attacker_clock(r, later + np.sort(r.integers(0, r.integers(1, 4), k)))
            if c.shifted(later):  # a counterfeit ring: in person, at a few times the ticket
                mcc = COUNTERFEIT_MCCS[r.integers(0, COUNTERFEIT_MCCS.size, k)]
                amounts = MCC_MEDIAN[mcc] * r.lognormal(np.log(3), 0.4, k)
                copies = self._payments(r, np.full(k, card), ts, amounts, mcc, ATTACK_FRAUD)
            else:  # online, at everyday online shops, for everyday amounts
                mcc = ONLINE_MCCS[r.integers(0, ONLINE_MCCS.size, k)]
                amounts = r.lognormal(np.log(MCC_MEDIAN[mcc]), 0.7)
                copies = self._payments(r, np.full(k, card), ts, amounts, mcc, ATTACK_FRAUD)
            self._schedule(copies)

        # Card testing: tiny online payments within half an hour, then a large one.
        r = _rng(c, day, 4)
        for card in active[r.random(active.size) < c.testing_rate * attack]:
            k = int(r.integers(3, 7))
            start = self._attacker_clock(r, np.array([day]))[0]
            ts = start + np.sort(r.integers(0, US_PER_HOUR // 2, k))
            self._schedule(self._payments(r, np.full(k, card), ts, r.uniform(0.5, 2.0, k),
                                          np.full(k, TESTING_MCC), ATTACK_FRAUD, online=True))  # fmt: skip
            big = ts[-1] + int(r.integers(US_PER_HOUR // 6, US_PER_HOUR))
            self._schedule(self._attack(r, np.array([card]), np.array([big]),
                                        r.lognormal(np.log(400), 0.5, 1)))  # fmt: skip

        # Takeovers: a profile change, then large online payments within a day.
        r = _rng(c, day, 5)
        for card in active[r.random(active.size) < c.takeover_rate * attack]:
            at = self._attacker_clock(r, np.array([day]))[0]
            chunks.append(_chunk(1, card=card, ts=at, etype=PROFILE_CHANGE,
                                 field=int(r.integers(0, 2))))  # fmt: skip
            k = int(r.integers(1, 4))
            ts = at + np.sort(r.integers(US_PER_HOUR, 24 * US_PER_HOUR, k))
            self._schedule(self._attack(r, np.full(k, card), ts, r.lognormal(np.log(300), 0.6, k)))

        # The holders' own profile changes.
        r = _rng(c, day, 6)
        moved = active[r.random(active.size) < c.profile_changes_per_year / 365]
        field = r.integers(0, len(PROFILE_FIELDS), moved.size)
        at = self._clock(r, moved, day)
        chunks.append(_chunk(moved.size, card=moved, etype=PROFILE_CHANGE, ts=at, field=field))
        # A new address is a new region from the change on: a new row of the holder's profile.
        address = field == ADDRESS
        self.region[moved[address]] = (
            self.region[moved[address]] + r.integers(1, len(REGIONS), address.sum())
        ) % len(REGIONS)
        self._profile(moved[address], at[address])

        # Every reported fraud is charged back days later.
        r = _rng(c, day, 7)
        today = _concat(self.chunks)
        fraud = np.flatnonzero(today["fraud"] == 1)
        delay = r.integers(*CHARGEBACK_DAYS, fraud.size) * US_PER_DAY
        self._schedule(_chunk(fraud.size, card=today["card"][fraud], etype=CHARGEBACK,
                              ts=today["ts"][fraud] + delay, amount=today["amount"][fraud]))  # fmt: skip
        return [today]

    def _profile(self, cards: np.ndarray, at: np.ndarray) -> None:
        """The holders' profile (the `holders` reference table) as it is from `at` on."""
        self.profiles.append((cards, at, self.region[cards], self.age_band[cards]))

    def holders(self) -> pl.DataFrame:
        """Every profile row so far, in the columns of the pack's `holders` reference."""
        card, at, region, age = (np.concatenate(c) for c in zip(*self.profiles, strict=True))
        epoch = datetime.fromisoformat(self.cfg.start).date().toordinal() - _UNIX_DAY
        return pl.DataFrame({
            "entity_id": _ids("c", card, width=7),
            "valid_from": pl.Series(at + epoch * US_PER_DAY).cast(pl.Datetime("us", "UTC")),
            "region": _decode(REGIONS, region),
            "age_band": _decode(AGE_BANDS, age),
        }).sort("valid_from", "entity_id")  # fmt: skip

    def _schedule(self, chunk: dict[str, np.ndarray]) -> None:
        """Events of any later day into the pending days they fall on; today's stay today."""
        days = chunk["ts"] // US_PER_DAY
        for d in np.unique(days):
            part = {k: v[days == d] for k, v in chunk.items()}
            (self.chunks if d == self.day else self.pending[int(d)]).append(part)

    def frame(self, day: int, chunks: list[dict[str, np.ndarray]]) -> pl.DataFrame:
        cols = _concat(chunks)
        order = np.lexsort((cols["etype"], cols["card"], cols["ts"]))
        cols = {k: v[order] for k, v in cols.items()}
        n = cols["card"].size
        card = cols["card"]
        epoch = datetime.fromisoformat(self.cfg.start).date().toordinal() - _UNIX_DAY
        payment = cols["etype"] == PAYMENT
        frame = pl.DataFrame({
            "entity_id": _ids("c", card, width=7),
            "event_id": [f"k{day:04d}-{i:06d}" for i in range(n)],
            "ts": pl.Series(cols["ts"] + epoch * US_PER_DAY).cast(pl.Datetime("us", "UTC")),
            "event_type": _decode(EVENT_TYPES, cols["etype"]),
            "amount": pl.Series(cols["amount"], nan_to_null=True),
            "channel": _decode(CHANNELS, cols["channel"]),
            "mcc": _decode(MCCS, cols["mcc"]),
            "merchant_id": _ids("m", cols["merchant"]),
            "terminal_id": _ids("t", cols["terminal"]),
            "profile_field": _decode(PROFILE_FIELDS, cols["field"]),
            # A holder's region and age band are the `holders` reference table's (`references`).
            "region": _decode(REGIONS, np.full(n, -1)),
            "age_band": _decode(AGE_BANDS, np.full(n, -1)),
            "is_fraud": pl.Series(np.where(payment, cols["fraud"], np.nan), nan_to_null=True),
            "true_p_fraud": pl.Series(cols["p"], nan_to_null=True),
        })  # fmt: skip
        return frame.cast(PACK.event_schema())


def _days(world: _World, days: range | None) -> Iterator[tuple[int, pl.DataFrame]]:
    days = range(world.cfg.n_days) if days is None else days
    if days.step != 1 or (len(days) and (days.start < 0 or days.stop > world.cfg.n_days)):
        raise ValueError(
            f"days must be a contiguous range inside [0, {world.cfg.n_days}), got {days}"
        )
    for day in range(days.stop):
        chunks = world.step(day)
        if day >= days.start:
            yield day, world.frame(day, chunks)


def iter_days(config: WorldConfig, days: range | None = None) -> Iterator[tuple[int, pl.DataFrame]]:
    """Each requested day's events as the card feed delivers them (a holder's region and age
    band come from the `holders` reference table), in order; the state is stepped from day 0
    whatever the range, so a day is the same whichever run produced it."""
    yield from _days(_World(config), days)


def references(config: WorldConfig) -> dict[str, pl.DataFrame]:
    """The pack's reference tables over the world's whole span: `holders`, each card's region
    and age band from the day it is issued, and a new region from each move."""
    world = _World(config)
    for day in range(config.n_days):
        world.step(day)
    return {"holders": world.holders()}


def simulate(config: WorldConfig, days: range | None = None) -> pl.DataFrame:
    """Events of `days` (default: all), sorted by time, in `PACK`'s schema, with the reference
    tables' columns attached as ingest attaches them."""
    world = _World(config)
    frames = [frame for _, frame in _days(world, days)]
    if not frames:
        return pl.DataFrame(schema=PACK.event_schema())
    return attach(pl.concat(frames), {"holders": world.holders()}, PACK)
