"""Data-quality checks on a batch of ingested events: the facts behind the blocking asset checks.

Each check returns a `CheckOutcome` (passed, a one-line description, figures for the UI), so the
orchestrator only has to translate outcomes; the thresholds are a typed, frozen config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import polars as pl

from eventml.schema import REQUIRED_COLUMNS, DatasetSpec


@dataclass(frozen=True)
class QualityThresholds:
    max_null_rate: float = 0.0  # required fields of clean rows are never null
    max_reject_rate: float = 0.05
    # A day with less than half or more than twice the trailing median volume is suspect.
    volume_band: tuple[float, float] = (0.5, 2.0)
    volume_window_days: int = 28
    volume_min_history_days: int = 28  # judge only against a full window: sources ramp up


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    figures: dict = field(default_factory=dict)


def check_schema(clean: pl.DataFrame, spec: DatasetSpec) -> CheckOutcome:
    expected = spec.event_schema()
    got = dict(clean.schema)
    missing = [c for c in expected if c not in got]
    wrong = {c: str(got[c]) for c, t in expected.items() if c in got and got[c] != t}
    extra = [c for c in got if c not in expected]
    ok = not (missing or wrong or extra)
    return CheckOutcome(
        "schema",
        ok,
        "columns and types match the dataset spec"
        if ok
        else f"schema differs from spec: missing {missing}, wrong types {wrong}, unexpected {extra}",
        {"columns": len(got), "missing": missing, "wrong_types": wrong, "unexpected": extra},
    )


def check_null_rates(clean: pl.DataFrame, t: QualityThresholds) -> CheckOutcome:
    n = max(clean.height, 1)
    rates = {c: clean[c].null_count() / n for c in REQUIRED_COLUMNS}
    worst = max(rates, key=rates.get)
    ok = rates[worst] <= t.max_null_rate
    return CheckOutcome(
        "required_fields_not_null",
        ok,
        f"highest null rate among required fields: {worst} {rates[worst]:.4%}",
        {"null_rates": rates},
    )


def check_unique_ids(clean: pl.DataFrame) -> CheckOutcome:
    dupes = clean.height - clean["event_id"].n_unique()
    return CheckOutcome(
        "unique_event_ids",
        dupes == 0,
        f"{dupes} duplicate event ids among clean rows",
        {"duplicates": dupes},
    )


def check_reject_rate(n_clean: int, n_rejected: int, t: QualityThresholds) -> CheckOutcome:
    rate = n_rejected / max(n_clean + n_rejected, 1)
    return CheckOutcome(
        "reject_rate",
        rate <= t.max_reject_rate,
        f"{rate:.3%} of rows rejected (limit {t.max_reject_rate:.1%})",
        {"reject_rate": rate, "rejected": n_rejected, "clean": n_clean},
    )


def check_daily_volume(
    run_counts: dict[date, int], prior_counts: dict[date, int], t: QualityThresholds
) -> CheckOutcome:
    """Each day of the run against the median of the days before it (earlier runs and this one).
    Days without enough history are not judged: a young source has no baseline yet."""
    counts = pl.DataFrame(
        {"day": [*prior_counts, *run_counts], "n": [*prior_counts.values(), *run_counts.values()]},
        schema={"day": pl.Date, "n": pl.Int64},
    ).sort("day")
    lo, hi = t.volume_band
    judged = (
        counts.with_columns(
            pl.col("n")
            .shift(1)
            .rolling_median(t.volume_window_days, min_samples=t.volume_min_history_days)
            .alias("median")
        )
        .filter(pl.col("day").is_in(list(run_counts)) & pl.col("median").is_not_null())
        .with_columns((pl.col("n") / pl.col("median")).alias("ratio"))
    )
    outliers = judged.filter((pl.col("ratio") < lo) | (pl.col("ratio") > hi))
    return CheckOutcome(
        "daily_volume",
        outliers.height == 0,
        f"{outliers.height} of {judged.height} judged days outside {lo}x–{hi}x the trailing median",
        {
            "days_judged": judged.height,
            "outlier_days": [str(d) for d in outliers["day"].to_list()[:20]],
            "min_ratio": judged["ratio"].min() if judged.height else None,
            "max_ratio": judged["ratio"].max() if judged.height else None,
        },
    )


def check_no_day_shrinks(
    run_counts: dict[date, int], stored_counts: dict[date, int], allowed: bool = False
) -> CheckOutcome:
    """Rows in (clean + rejected) per day against what the table already holds for it. A day
    that would lose rows means a source forgot what it delivered; it is replaced only when
    the run says so (`allowed`)."""
    shrunk = {
        str(d): (n, run_counts.get(d, 0))
        for d, n in sorted(stored_counts.items())
        if run_counts.get(d, 0) < n
    }
    figures = {"days_compared": len(stored_counts), "shrunk_days": dict(list(shrunk.items())[:20])}
    if not shrunk:
        return CheckOutcome("no_day_shrinks", True, "no day has fewer rows than before", figures)
    worst = ", ".join(f"{d}: {old:,} -> {new:,}" for d, (old, new) in list(shrunk.items())[:5])
    if allowed:
        return CheckOutcome(
            "no_day_shrinks", True, f"{len(shrunk)} days replaced knowingly ({worst})", figures
        )
    return CheckOutcome(
        "no_day_shrinks",
        False,
        f"{len(shrunk)} days would have fewer rows than the table holds ({worst}); nothing was "
        "written. If the source really lost them, re-run with allow_shrinking_days: true",
        figures,
    )


def check_events(
    clean: pl.DataFrame,
    rejects: pl.DataFrame,
    spec: DatasetSpec,
    prior_counts: dict[date, int],
    t: QualityThresholds = QualityThresholds(),
) -> list[CheckOutcome]:
    run_counts = dict(clean.group_by("day").len().iter_rows()) if "day" in clean.columns else {}
    return [
        check_schema(clean.drop("day", strict=False), spec),
        check_null_rates(clean, t),
        check_unique_ids(clean),
        check_daily_volume(run_counts, prior_counts, t),
        check_reject_rate(clean.height, rejects.height, t),
    ]
