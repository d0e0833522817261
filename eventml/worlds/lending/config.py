"""The lending world's vocabulary and knobs: the pack's vocabularies as the integer codes the
simulator draws (their positions in `pack.yaml`), the fixed amounts and timings of its
behaviour, `WorldConfig`, and the per-day random streams every part draws from.

Kept apart so that every other part (population, daily step, loans, frame assembly) reads its
codes and constants from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

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
