"""The out-of-time report: every model judged on the same test rows, the plots behind the
figures, and what monitoring later compares production with.

`model_evaluation` (the asset) gathers the scores — the challenger, the features-only baseline,
the encoder alone, the current champion with its own encoder, the simulator's oracle — and
calls `out_of_time_report`; everything the UI and MLflow then show comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from eventml.evaluate import (
    calibration_plot,
    compare,
    metrics,
    roc_plot,
    score_distribution_plot,
)
from eventml.pack import DatasetPack

METRICS = ("auc", "gini", "ks", "pr_auc", "brier", "ece")
REFERENCE_ROWS = 10_000
REFERENCE_ARTIFACT = "monitoring/reference.parquet"  # where a challenger's run keeps it


@dataclass(frozen=True)
class Report:
    table: pl.DataFrame  # model, task, n, rate and METRICS per row
    by_segment: pl.DataFrame  # the same per segment of the pack's `segments`
    plots: dict[str, bytes]  # name -> PNG: ROC, calibration and score distribution per task
    # Per task with an oracle: its AUC on the decisions whose outcome was still open when they
    # were made (0 < true p < 1). A simulator may draw an outcome before the decision is made;
    # no history shows it, so this is the realistic ceiling.
    open_outcome_oracle: dict[str, float]

    def auc(self, model: str, task: str) -> float:
        found = self.table.filter((pl.col("model") == model) & (pl.col("task") == task))["auc"]
        return float(found[0]) if found.len() else float("nan")

    def embedding_lift(self) -> dict[str, float]:
        """Per task: the challenger's AUC minus the features-only baseline's."""
        tasks = self.table["task"].unique(maintain_order=True)
        return {t: self.auc("challenger", t) - self.auc("baseline", t) for t in tasks}

    def oracle_gap(self) -> dict[str, float]:
        """Per task with an oracle: how far the challenger is from the best any model can do."""
        tasks = self.table.filter(pl.col("model") == "oracle")["task"]
        return {t: self.auc("oracle", t) - self.auc("challenger", t) for t in tasks}


def scores_with_oracle(
    test: pl.DataFrame, scores: dict[str, dict[str, np.ndarray]], pack: DatasetPack
) -> dict[str, dict[str, np.ndarray]]:
    """The models' scores plus the simulator's true probabilities where the pack names them."""
    tasks = {t for s in scores.values() for t in s}
    oracle = {t: test[c].to_numpy() for t, c in pack.oracle.items() if t in tasks}
    return {**scores, "oracle": oracle} if oracle else dict(scores)


def out_of_time_report(
    test: pl.DataFrame, scores: dict[str, dict[str, np.ndarray]], pack: DatasetPack
) -> Report:
    """Metrics of every model (`scores`: model -> task -> probability per test row, which must
    include "challenger") per task and segment, and the plots, on the decisions whose label is
    known."""
    scores = scores_with_oracle(test, scores, pack)
    tasks = list(scores["challenger"])
    table, by_segment = compare(test, scores, tasks, {x.name: x.expr() for x in pack.segments})
    open_outcome = {}
    for task, truth in scores.get("oracle", {}).items():
        rows = test[task].is_not_null().to_numpy() & (truth > 0) & (truth < 1)
        open_outcome[task] = metrics(test[task].to_numpy()[rows], truth[rows]).auc
    plots = {}
    for task in tasks:
        known = test[task].is_not_null().to_numpy()
        y = test[task].to_numpy()[known]
        shown = {m: np.asarray(s[task])[known] for m, s in scores.items() if task in s}
        plots[f"roc_{task}"] = roc_plot(y, shown, f"ROC, {task} (out of time)")
        plots[f"calibration_{task}"] = calibration_plot(
            y, {m: shown[m] for m in shown if m != "oracle"}, f"calibration, {task}"
        )
        plots[f"scores_{task}"] = score_distribution_plot(
            y, shown["challenger"], f"challenger scores, {task}"
        )
    return Report(table, by_segment, plots, open_outcome)


def reference_sample(
    test: pl.DataFrame, scores: dict[str, np.ndarray], feature_names: list[str]
) -> pl.DataFrame:
    """What monitoring compares production against: a sample of the test decisions a model is
    judged (and maybe promoted) on, with its features and its own scores."""
    reference = test.select("decision_id", "ts", *feature_names).with_columns(
        pl.Series(f"p_{t}", np.asarray(p, dtype=np.float64)) for t, p in scores.items()
    )
    return reference.sample(min(REFERENCE_ROWS, reference.height), seed=0)
