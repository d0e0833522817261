"""Is production still the world the model was trained on? How far each feature (and the
score) has moved from a reference sample, as a population stability index with conventional
bands and a two-sample KS test, and a verdict a sensor can act on. Whether the model is still
right about it is `eventml.performance`.

Plain NumPy/Polars in, plain values out, so the monitoring assets and the sensors only translate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import polars as pl
from scipy import stats

from eventml.evaluate import _figure, _png
from eventml.features import WINDOWED_KINDS, FeatureSet
from eventml.sources import DAY

# A bin that is empty on one side counts as this share of its rows, so that ln(current/reference)
# stays finite. 1e-4 is "1 row in 10,000": a bin empty in the reference that holds 1% of the
# current rows then adds (0.01 - 0.0001) * ln(100) ≈ 0.046 to the PSI — noticeable, not alarming.
EPSILON = 1e-4


@dataclass(frozen=True)
class DriftThresholds:
    """PSI bands (Siddiqi, *Credit Risk Scorecards*: < 0.1 stable, 0.1–0.25 watch, > 0.25 act)
    and when drift is enough to retrain: the score moved, or enough features did at once."""

    watch: float = 0.10
    act: float = 0.25
    score_psi_act: float = 0.25
    # One feature past `act` is often a pipeline change worth a look, not a new world.
    features_to_act: int = 3

    def __post_init__(self):
        if not 0 <= self.watch <= self.act:
            raise ValueError(f"need 0 <= watch <= act, got watch={self.watch}, act={self.act}")
        if self.features_to_act < 1:
            raise ValueError(f"features_to_act must be at least 1, got {self.features_to_act}")


def band(value: float, thresholds: DriftThresholds = DriftThresholds()) -> str:
    """The PSI band: stable below `watch`, act above `act`, watch in between (ends included)."""
    if value < thresholds.watch:
        return "stable"
    return "act" if value > thresholds.act else "watch"


# ------------------------------------------------------------------ statistics


def _is_numeric(values: np.ndarray) -> bool:
    return values.dtype.kind in "biuf"


def _numeric_counts(ref: np.ndarray, cur: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts per bin, reference and current; `ref` and `cur` are sorted finite values.

    Bins: below the reference minimum e_0, the quantile bins [e_i, e_i+1) of the reference, the
    maximum itself, above the maximum. Tied quantiles collapse into one bin, so a 0/1 column gets
    (<0, [0, 1), =1, >1) and a constant column c gets (<c, =c, >c): a constant that moves is still
    seen. The end bins are empty in the reference by construction.
    """
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))

    def counts(x: np.ndarray) -> np.ndarray:
        below = np.searchsorted(x, edges, side="left")  # rows < e_i
        return np.diff(
            np.concatenate(([0], below, [np.searchsorted(x, edges[-1], side="right"), len(x)]))
        )

    return counts(ref), counts(cur)


def _categorical_counts(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One bin per category seen on either side (a new category is a bin empty in the reference)."""
    categories, inverse = np.unique(np.concatenate([ref, cur]).astype(str), return_inverse=True)
    n = len(categories)
    return (
        np.bincount(inverse[: len(ref)], minlength=n),
        np.bincount(inverse[len(ref) :], minlength=n),
    )


def _psi_from_counts(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    r = np.maximum(ref_counts / ref_counts.sum(), EPSILON)
    c = np.maximum(cur_counts / cur_counts.sum(), EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def _missing(values: np.ndarray) -> np.ndarray:
    if _is_numeric(values):
        return ~np.isfinite(values.astype(np.float64))
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in values])


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference`: sum over bins of
    (c - r) * ln(c / r), with r and c the shares of rows in each bin.

    Numbers get `bins` quantile bins of the reference (see `_numeric_counts` for ties and
    constant columns); anything else (strings) gets one bin per category. Missing values (None,
    NaN, and ±inf, which no quantile bin can hold) are one more bin, so a rise in the missing
    rate is drift like any other. Empty bins count as EPSILON.
    """
    reference, current = np.asarray(reference), np.asarray(current)
    if len(reference) == 0 or len(current) == 0:
        raise ValueError(
            f"PSI needs rows on both sides, got {len(reference)} reference and {len(current)} "
            "current rows; compare against a non-empty window"
        )
    miss_r, miss_c = _missing(reference), _missing(current)
    ref, cur = reference[~miss_r], current[~miss_c]
    if _is_numeric(reference) and _is_numeric(current):
        ref, cur = np.sort(ref.astype(np.float64)), np.sort(cur.astype(np.float64))
        if len(ref):
            ref_counts, cur_counts = _numeric_counts(ref, cur, bins)
        else:  # nothing but missing values in the reference: every present value is new
            ref_counts, cur_counts = np.array([0]), np.array([len(cur)])
    else:
        ref_counts, cur_counts = _categorical_counts(ref, cur)
    return _psi_from_counts(
        np.append(ref_counts, miss_r.sum()), np.append(cur_counts, miss_c.sum())
    )


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov (statistic, p-value) on the finite values of each side;
    (nan, nan) when a side has none. With tens of thousands of rows even a harmless shift has a
    tiny p-value: read the statistic (the largest gap between the two CDFs), band on PSI."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if len(ref) == 0 or len(cur) == 0:
        return float("nan"), float("nan")
    # The exact distribution is quadratic in the sample sizes; beyond a few thousand rows the
    # asymptotic one is as good and keeps a 200-column table at a few seconds.
    method = "exact" if len(ref) * len(cur) <= 1_000_000 else "asymp"
    result = stats.ks_2samp(ref, cur, method=method)
    return float(result.statistic), float(result.pvalue)


# ------------------------------------------------------------------ a table of features


def _column_values(frame: pl.DataFrame, column: str) -> tuple[np.ndarray, float]:
    """The values as NumPy (nulls as NaN for numbers, None otherwise) and the missing rate."""
    series = frame.get_column(column)
    if series.dtype.is_numeric() or series.dtype == pl.Boolean:
        values = series.cast(pl.Float64).to_numpy()
        rate = float(np.mean(~np.isfinite(values)))
    else:
        values = series.cast(pl.String).to_numpy()
        rate = series.null_count() / len(series)
    return values, rate


def drift_table(
    reference: pl.DataFrame, current: pl.DataFrame, columns: list[str], bins: int = 10,
    thresholds: DriftThresholds = DriftThresholds(),
) -> pl.DataFrame:  # fmt: skip
    """One row per column, worst first: psi, band, ks_statistic and ks_pvalue (null for
    categorical columns), null_rate_reference and null_rate_current (null, NaN or ±inf)."""
    absent = {
        name: [c for c in columns if c not in frame.columns]
        for name, frame in (("reference", reference), ("current", current))
    }
    if any(absent.values()):
        raise ValueError(f"drift_table: columns missing from the frames: {absent}")
    if reference.height == 0 or current.height == 0:
        raise ValueError(
            f"drift_table needs rows on both sides, got {reference.height} reference and "
            f"{current.height} current rows"
        )
    rows = []
    for column in columns:
        ref, null_ref = _column_values(reference, column)
        cur, null_cur = _column_values(current, column)
        numeric = _is_numeric(ref)
        statistic, pvalue = ks(ref, cur) if numeric else (None, None)
        value = psi(ref, cur, bins)
        rows.append({
            "column": column, "psi": value, "band": band(value, thresholds),
            "ks_statistic": statistic, "ks_pvalue": pvalue,
            "null_rate_reference": null_ref, "null_rate_current": null_cur,
        })  # fmt: skip
    schema = {
        "column": pl.String, "psi": pl.Float64, "band": pl.String, "ks_statistic": pl.Float64,
        "ks_pvalue": pl.Float64, "null_rate_reference": pl.Float64, "null_rate_current": pl.Float64,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema).sort(
        ["psi", "ks_statistic"], descending=True, nulls_last=True
    )


def drift_verdict(
    table: pl.DataFrame, score_psi: float | dict[str, float] | None,
    thresholds: DriftThresholds = DriftThresholds(),
) -> tuple[bool, list[str], dict]:  # fmt: skip
    """Retrain when a score's PSI passes `score_psi_act`, or when at least `features_to_act`
    features pass `act`. `score_psi` is one score's PSI, or one per task ({task: psi}); None
    means no score to compare yet (features only).

    Returns (should_retrain, reasons: the triggers that fired, or one line saying why none did,
    figures for asset metadata and run tags)."""
    scores = score_psi if isinstance(score_psi, dict) else (
        {} if score_psi is None else {"score": score_psi}
    )  # fmt: skip
    past = table.filter(pl.col("psi") > thresholds.act)["column"].to_list()
    watching = table.filter(pl.col("band") == "watch").height
    reasons = [
        f"{'score' if name == 'score' else name + ' score'} PSI {value:.3f} > {thresholds.score_psi_act}"
        for name, value in scores.items()
        if value > thresholds.score_psi_act
    ]
    if len(past) >= thresholds.features_to_act:
        reasons.append(
            f"{len(past)} features with PSI > {thresholds.act} "
            f"(>= {thresholds.features_to_act} to act): {', '.join(past)}"
        )
    should_retrain = bool(reasons)
    worst_score = max(scores.values()) if scores else None
    if not should_retrain:
        score = "no score to compare" if not scores else f"score PSI {worst_score:.3f}"
        reasons.append(
            f"no retrain: {score} (acts above {thresholds.score_psi_act}), {len(past)} of "
            f"{table.height} features past {thresholds.act} (acts at {thresholds.features_to_act})"
        )
    worst = table.sort("psi", descending=True, nulls_last=True).head(1)
    figures = {
        "score_psi": worst_score,
        "score_band": None if worst_score is None else band(worst_score, thresholds),
        **({"score_psi_by_task": scores} if isinstance(score_psi, dict) else {}),
        "features": table.height,
        "features_act": len(past),
        "features_watch": watching,
        "features_past_act": past,
        "worst_feature": worst["column"].item() if worst.height else None,
        "worst_psi": worst["psi"].item() if worst.height else None,
    }
    return should_retrain, reasons, figures


@dataclass(frozen=True)
class DayDrift:
    """One judged day: its window's sizes, every column's drift and each task score's PSI."""

    day: date
    decisions: int
    scored: int
    table: pl.DataFrame  # drift_table's rows for the features
    score_psi: dict[str, float]  # task -> PSI of p_<task>; empty when too little was served


def drift_by_day(
    reference: pl.DataFrame, features: pl.DataFrame, served: pl.DataFrame, days: list[date], *,
    columns: list[str], monitored: set[str], tasks: list[str], window_days: int,
    thresholds: DriftThresholds = DriftThresholds(), min_rows: int = 100,
    log: Callable[[str], None] = print,
) -> tuple[pl.DataFrame, DayDrift | None]:  # fmt: skip
    """Each day's drift over the trailing `window_days` of decisions (`features`) and of served
    scores (`served`, with p_<task>), both with a `day` column, against `reference`.

    Returns one row per day and column (drift_table's columns plus day, monitored, decisions;
    task scores as p_<task> rows), and the newest judged day: what a verdict is taken on. A day
    whose window holds fewer than `min_rows` decisions is noise, not evidence: it is skipped."""
    rows, newest = [], None
    for day in days:
        since = day - timedelta(days=window_days - 1)
        current = features.filter(pl.col(DAY).is_between(since, day))
        if current.height < min_rows:
            log(f"{day}: {current.height} decisions in the window, not judged")
            continue
        table = drift_table(reference, current, columns, thresholds=thresholds)
        scored = served.filter(pl.col(DAY).is_between(since, day))
        score_psi = {
            t: psi(reference[f"p_{t}"].to_numpy(), scored[f"p_{t}"].to_numpy())
            for t in tasks
            if scored.height >= min_rows
        }
        newest = DayDrift(day, current.height, scored.height, table, score_psi)
        score_rows = pl.DataFrame(
            {
                "column": [f"p_{t}" for t in score_psi],
                "psi": list(score_psi.values()),
                "band": [band(v, thresholds) for v in score_psi.values()],
            },
            schema={"column": pl.String, "psi": pl.Float64, "band": pl.String},
        )
        judged = [*monitored, *(f"p_{t}" for t in score_psi)]
        rows.append(
            pl.concat([table, score_rows], how="diagonal_relaxed").with_columns(
                pl.lit(day).alias(DAY),
                pl.col("column").is_in(judged).alias("monitored"),
                pl.lit(current.height).alias("decisions"),
            )
        )
    out = pl.concat(rows) if rows else pl.DataFrame(schema={DAY: pl.Date, "column": pl.String})
    return out, newest


def monitored_features(feature_set: FeatureSet) -> list[str]:
    """The features whose distribution should hold still in a stable world: bounded windows,
    static attributes and the decision's own fields. Lifetime counts, "days since" recencies
    and seen-before counts grow with every user's age by construction, so against a reference
    a few months old they drift with no change in the world (measured: 23-45 of them past 0.25
    on a 1,000-person world months before any shift); `feature_drift` still reports them."""
    trending = {"days_since", "seen_before"}
    return [
        f.name
        for f in feature_set.features
        if f.kind not in trending and not (f.kind in WINDOWED_KINDS and f.window == "all")
    ]


def drift_plot(
    table: pl.DataFrame, top: int = 10, thresholds: DriftThresholds = DriftThresholds()
) -> bytes:
    """PNG: the `top` worst features' PSI as horizontal bars coloured by band, with the band lines."""
    worst = table.sort("psi", descending=True, nulls_last=True).head(top).reverse()
    fig, ax = _figure(f"feature drift: worst {worst.height} of {table.height} (PSI)")
    colours = {"stable": "tab:green", "watch": "tab:orange", "act": "tab:red"}
    ax.barh(worst["column"].to_list(), worst["psi"].to_list(),
            color=[colours[b] for b in worst["band"].to_list()])  # fmt: skip
    ax.axvline(
        thresholds.watch, color="tab:orange", linestyle="--", label=f"watch {thresholds.watch}"
    )
    ax.axvline(thresholds.act, color="tab:red", linestyle="--", label=f"act {thresholds.act}")
    ax.set_xlabel("population stability index")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)
