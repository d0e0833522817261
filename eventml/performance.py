"""Is the live model still right? AUC and calibration on decisions made since the model went
live, counting only labels that have matured (a 90-day default label is unknown for 90 days),
refusing to judge samples too small to tell decay from noise, and a verdict a sensor can act on
(`eventml.drift` asks whether the inputs moved).

Plain NumPy/Polars in, plain values out, so the monitoring assets and the sensors only translate.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import polars as pl

from eventml.evaluate import expected_calibration_error, metrics
from eventml.sources import DAY, midnight


def live_performance(
    decisions: pl.DataFrame, scores: pl.DataFrame, task: str, live_since: datetime, as_of: datetime
) -> dict:
    """How the live model did on `task`, judged only where the outcome is known.

    Window: decisions with live_since <= ts <= as_of (the data's "now", not the wall clock).
    `decisions` has decision_id, ts, `task` (1/0, null until known) and `task`_matured (as in
    `labels.build_decisions`); when `task`_matures_at is there too, maturity is re-checked
    against `as_of`, so a table built later cannot lend labels from the future. `scores` has
    decision_id and p_`task`.

    Counts: decisions in the window, unscored (no score logged), pending (scored, label not
    matured: counted, never scored), not_applicable (matured, but the label does not apply),
    n (matured, labelled and scored: the rows behind auc, ece, observed_rate, mean_predicted).
    """
    matured_col, score_col = f"{task}_matured", f"p_{task}"
    missing = [c for c in ("decision_id", "ts", task, matured_col) if c not in decisions.columns]
    missing += [f"scores.{c}" for c in ("decision_id", score_col) if c not in scores.columns]
    if missing:
        raise ValueError(f"live_performance({task!r}): missing columns {missing}")
    duplicated = scores.height - scores["decision_id"].n_unique()
    if duplicated:
        raise ValueError(
            f"scores has {duplicated} duplicated decision_id rows; keep one score per decision"
        )
    matured = pl.col(matured_col).fill_null(False)
    if f"{task}_matures_at" in decisions.columns:
        matured = matured & (pl.col(f"{task}_matures_at") <= as_of)
    window = (
        decisions.filter(pl.col("ts").is_between(live_since, as_of, closed="both"))
        .join(scores.select("decision_id", score_col), on="decision_id", how="left")
        .with_columns(pl.col(score_col).is_not_null().alias("__scored"), matured.alias("__matured"))
    )
    counts = window.select(
        decisions=pl.len(),
        unscored=(~pl.col("__scored")).sum(),
        pending=(pl.col("__scored") & ~pl.col("__matured")).sum(),
        not_applicable=(pl.col("__scored") & pl.col("__matured") & pl.col(task).is_null()).sum(),
    ).row(0, named=True)
    judged = window.filter(pl.col("__scored") & pl.col("__matured") & pl.col(task).is_not_null())
    y = judged[task].cast(pl.Int64).to_numpy()
    p = judged[score_col].cast(pl.Float64).to_numpy()
    n = len(y)
    return {
        "task": task,
        "live_since": live_since.isoformat(),
        "as_of": as_of.isoformat(),
        **{k: int(v) for k, v in counts.items()},
        "n": n,
        "positives": int(y.sum()),
        "auc": metrics(y, p).auc if n else float("nan"),
        "ece": expected_calibration_error(y, p),
        "observed_rate": float(y.mean()) if n else float("nan"),
        "mean_predicted": float(p.mean()) if n else float("nan"),
    }


def performance_verdict(
    live: dict, reference_auc: float, max_auc_drop: float = 0.05, *,
    min_labels: int = 1000, min_positives: int = 50,
) -> tuple[bool, list[str]]:  # fmt: skip
    """Retrain when the live AUC is more than `max_auc_drop` below `reference_auc` (the AUC the
    model was promoted on). Below `min_labels` matured labels or `min_positives` of either class
    it does not judge: with 50 positives an AUC's standard error is still about 0.04
    (Hanley & McNeil), as large as the drop it looks for, so a smaller sample would raise false
    alarms. Returns (should_retrain, reasons)."""
    n, positives = live["n"], live["positives"]
    if n < min_labels or min(positives, n - positives) < min_positives:
        return False, [
            f"not judging {live['task']}: {n} matured labels with {positives} positives "
            f"(needs {min_labels} labels and {min_positives} of each class); "
            f"{live['pending']} pending"
        ]
    drop = reference_auc - live["auc"]
    summary = (
        f"{live['task']} live AUC {live['auc']:.3f} vs reference {reference_auc:.3f} "
        f"(drop {drop:+.3f}, allowed {max_auc_drop}) on {n} matured decisions"
    )
    if drop > max_auc_drop:
        return True, [summary]
    return False, [f"no retrain: {summary}"]


def performance_by_day(
    decisions: pl.DataFrame, scores: pl.DataFrame, tasks: list[str],
    reference_auc: dict[str, float | None], live_since: datetime, days: list[date], *,
    max_auc_drop: float = 0.05, min_labels: int = 1000, min_positives: int = 50,
) -> tuple[pl.DataFrame, bool, list[str]]:  # fmt: skip
    """`live_performance` per task as of the end of each day, each with its verdict against the
    AUC the model was promoted on. Returns one row per day and task (with reference_auc and
    retrain), and the newest day's verdict: (should_retrain, reasons)."""
    rows, retrain, reasons = [], False, []
    for day in days:
        as_of = midnight(day + timedelta(days=1))  # the end of `day`
        for task in tasks:
            live = live_performance(decisions, scores, task, live_since, as_of)
            if reference_auc.get(task) is None:
                fires, why = False, [f"{task}: the model has no test AUC to compare against"]
            else:
                fires, why = performance_verdict(
                    live, reference_auc[task], max_auc_drop,
                    min_labels=min_labels, min_positives=min_positives,
                )  # fmt: skip
            rows.append(
                {DAY: day, **live, "reference_auc": reference_auc.get(task), "retrain": fires}
            )
            if day == days[-1]:
                retrain, reasons = retrain or fires, reasons + why
    return pl.DataFrame(rows), retrain, reasons
