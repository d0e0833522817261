"""Out-of-time train / valid / test assignment of decisions, and the checks that guard it.

The timeline is cut by decision time:

    train: ts < valid_start
    valid: valid_start <= ts < test_start - gap
    gap:   test_start - gap <= ts < test_start      (never used)
    test:  ts >= test_start

The gap is at least the longest label horizon, so every train or valid label has matured
before the first test decision: no outcome the model learned from happens inside the test
window. Cut-offs are dates, or fractions of the decisions whose labels have all matured (the
test set must be scorable): the latest `test_fraction` of them form the test set, and the
latest `valid_fraction` of those before the gap form the valid set.

Rows are assigned to splits by time only; which rows a model may use for a label is
`training_rows`: the split's rows whose label has matured and applies. Unmatured rows never
reach training. Across splits, `with_person_folds` deals people (not times) into folds, one
sequence encoder per fold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from eventml.quality import CheckOutcome
from eventml.schema import DatasetSpec
from eventml.sequences import stable_hash

SPLITS = ("train", "valid", "gap", "test")
SPLIT_TYPE = pl.Enum(SPLITS)


@dataclass(frozen=True)
class SplitConfig:
    valid_start: datetime | None = None  # None: from valid_fraction
    test_start: datetime | None = None  # None: from test_fraction
    valid_fraction: float = 0.2  # of the matured decisions before the gap
    test_fraction: float = 0.2  # of the matured decisions
    gap_days: float | None = None  # None: the longest label horizon; shorter is refused
    # label -> (low, high): a split's positive rate outside it is a failed check.
    label_rate_bands: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(
                    f"SplitConfig.{name} must be between 0 and 1, got {getattr(self, name)}"
                )


def longest_horizon(spec: DatasetSpec) -> timedelta:
    return timedelta(days=max((label.horizon_days for label in spec.labels), default=0))


def _gap(spec: DatasetSpec, config: SplitConfig) -> timedelta:
    need = longest_horizon(spec)
    if config.gap_days is None:
        return need
    gap = timedelta(days=config.gap_days)
    if gap < need:
        raise ValueError(
            f"SplitConfig.gap_days={config.gap_days} is shorter than the longest label horizon "
            f"({need.days} days): train labels would mature inside the test window; raise it or leave it unset"
        )
    return gap


def _quantile_ts(ts: pl.Series, q: float) -> datetime:
    ordered = ts.sort()
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def cutoffs(decisions: pl.DataFrame, spec: DatasetSpec, config: SplitConfig) -> dict[str, datetime]:
    """valid_start, gap_start, test_start for these decisions."""
    gap = _gap(spec, config)
    test_start = config.test_start
    if test_start is None:
        matured = pl.all_horizontal(
            [pl.col(f"{lb.name}_matured") for lb in spec.labels] or [pl.lit(True)]
        )
        ts = decisions.filter(matured)["ts"]
        if ts.len() == 0:
            raise ValueError(
                "no decision has all its labels matured: set test_start, or wait for more data"
            )
        test_start = _quantile_ts(ts, 1 - config.test_fraction)
    gap_start = test_start - gap
    valid_start = config.valid_start
    if valid_start is None:
        before = decisions.filter(pl.col("ts") < gap_start)["ts"]
        if before.len() == 0:
            raise ValueError(
                f"no decision before the gap ({gap_start:%Y-%m-%d}): the data is shorter than the "
                "gap plus a test window; lower test_fraction or use a longer history"
            )
        valid_start = _quantile_ts(before, 1 - config.valid_fraction)
    if valid_start > gap_start:
        raise ValueError(
            f"valid_start {valid_start} is after the gap start {gap_start}; move it earlier"
        )
    return {"valid_start": valid_start, "gap_start": gap_start, "test_start": test_start}


def split_decisions(
    decisions: pl.DataFrame, spec: DatasetSpec, config: SplitConfig = SplitConfig()
) -> pl.DataFrame:
    """`decisions` (from `build_decisions`) with a `split` column: train, valid, gap or test."""
    c = cutoffs(decisions, spec, config)
    split = (
        pl.when(pl.col("ts") < c["valid_start"]).then(pl.lit("train"))
        .when(pl.col("ts") < c["gap_start"]).then(pl.lit("valid"))
        .when(pl.col("ts") < c["test_start"]).then(pl.lit("gap"))
        .otherwise(pl.lit("test"))
    )  # fmt: skip
    return decisions.with_columns(split.cast(SPLIT_TYPE).alias("split"))


def fold_of(entity_ids: Iterable, folds: int = 2, salt: str = "") -> np.ndarray:
    """Each person's fold (0 … folds-1), from BLAKE2b of their id (and `salt`, which deals the
    same people another way): the same in every run and process, so a live decision's person is
    in the fold their training rows were."""
    return np.array(
        [stable_hash(salt + str(e)) % 10_000 * folds // 10_000 for e in entity_ids], dtype=np.int8
    )


def with_person_folds(splits: pl.DataFrame, folds: int = 2, salt: str = "") -> pl.DataFrame:
    """Add `fold` (`fold_of`) to every row. Each fold has its own sequence encoder, which learns
    decision labels from its people's train rows only, and every decision of a person, in
    training and live, takes the outputs of the encoders of the other folds, which never learned
    that person's labels (`eventml.embedding.SequenceModel.output_columns`): the scorers learn
    from every train row with encoder outputs that know nothing of that person's outcomes, as
    new people are met, and meet each person later with the same encoders.

    By person, not by time: a person's decisions weeks apart often share one outcome (one adverse
    event falls in both label windows), and the encoder recognises a person (their device, their
    habits), so an encoder that fitted some of a person's labels "knows" the outcome of their
    other decisions. Scorers that learned from such rows trusted that knowledge and met new
    decisions without it (docs/embedding-lift.md)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (one encoder per fold), got {folds}")
    people = splits["entity_id"].unique()
    dealt = pl.DataFrame({"entity_id": people, "fold": fold_of(people, folds, salt)})
    return splits.join(dealt, on="entity_id", how="left", maintain_order="left")


def training_rows(splits: pl.DataFrame, label: str, split: str = "train") -> pl.DataFrame:
    """The rows of `split` a model may use for `label`: matured, applicable (label not null)."""
    if split == "gap":
        raise ValueError("the gap is never used; ask for train, valid or test")
    return splits.filter(
        (pl.col("split") == split) & pl.col(f"{label}_matured") & pl.col(label).is_not_null()
    )


def split_summary(splits: pl.DataFrame, spec: DatasetSpec) -> dict:
    """Per split: rows, and per label the usable rows and their positive rate."""
    out: dict = {}
    for name in SPLITS:
        part = splits.filter(pl.col("split") == name)
        entry: dict = {"rows": part.height}
        if part.height:
            entry["from"], entry["to"] = str(part["ts"].min()), str(part["ts"].max())
        for label in spec.labels:
            known = part.filter(pl.col(f"{label.name}_matured"))[label.name].drop_nulls()
            entry[f"{label.name}_rows"] = known.len()
            entry[f"{label.name}_rate"] = float(known.mean()) if known.len() else None
        out[name] = entry
    return out


def check_splits(
    splits: pl.DataFrame, spec: DatasetSpec, config: SplitConfig = SplitConfig()
) -> list[CheckOutcome]:
    """The facts behind the blocking checks on `training_splits`; a failed outcome is a problem."""
    outcomes = []
    dupes = (
        splits.group_by("decision_id")
        .agg(pl.col("split").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
    )
    repeated = splits.height - splits["decision_id"].n_unique()
    outcomes.append(
        CheckOutcome(
            "no_decision_in_two_splits",
            dupes.height == 0 and repeated == 0,
            f"{dupes.height} decisions in more than one split, {repeated} repeated rows",
            {"in_two_splits": dupes["decision_id"].head(10).to_list(), "repeated_rows": repeated},
        )
    )

    # Every train/valid label must have matured before the first test decision, and the splits
    # must follow each other in time.
    first_test = splits.filter(pl.col("split") == "test")["ts"].min()
    fit = splits.filter(pl.col("split").is_in(["train", "valid"]))
    late: dict[str, str] = {}
    for label in spec.labels:
        last = fit[f"{label.name}_matures_at"].max()
        if first_test is not None and last is not None and last > first_test:
            late[label.name] = f"matures {last} after the first test decision {first_test}"
    spans = {s: splits.filter(pl.col("split") == s)["ts"] for s in ("train", "valid", "test")}
    for a, b in (("train", "valid"), ("valid", "test"), ("train", "test")):
        if spans[a].len() and spans[b].len() and spans[a].max() >= spans[b].min():
            late[f"{a}/{b}"] = f"{a} ends {spans[a].max()}, not before {b} starts {spans[b].min()}"
    outcomes.append(
        CheckOutcome(
            "horizon_gap",
            not late,
            "; ".join(f"{k}: {v}" for k, v in late.items())
            or "every train/valid label matures before the test window",
            {"violations": late},
        )
    )

    summary = split_summary(splits, spec)
    empty = [s for s in ("train", "valid", "test") if summary[s]["rows"] == 0]
    outcomes.append(
        CheckOutcome(
            "splits_not_empty",
            not empty,
            f"empty splits: {empty}" if empty else "train, valid and test have rows",
            {},
        )
    )
    off: dict[str, str] = {}
    for label, (low, high) in config.label_rate_bands.items():
        for s in ("train", "valid", "test"):
            rate = summary[s].get(f"{label}_rate")
            if rate is not None and not low <= rate <= high:
                off[f"{s}.{label}"] = f"{rate:.4f} outside [{low}, {high}]"
    outcomes.append(
        CheckOutcome(
            "label_rates_in_band",
            not off,
            "label rates within their bands"
            if not off
            else "; ".join(f"{k}: {v}" for k, v in off.items()),
            {"out_of_band": off, "summary": summary},
        )
    )
    return outcomes
