"""Out-of-time evaluation: the metrics a model-risk reviewer asks for, and the plots behind them.

Every function takes labels and probabilities (NumPy) so the same code judges the scorer, the
baseline, the encoder alone, the champion and the simulator's oracle on the same test rows.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve


@dataclass(frozen=True)
class Metrics:
    n: int
    positives: int
    rate: float
    auc: float
    gini: float
    ks: float
    pr_auc: float
    brier: float
    ece: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean predicted| over equal-count score bins, weighted by bin size.
    Equal-count bins, because default rates of a few percent leave equal-width bins nearly empty."""
    if len(y) == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    gaps = [
        abs(y[idx].mean() - p[idx].mean()) * len(idx)
        for idx in np.array_split(order, bins)
        if len(idx)
    ]
    return float(sum(gaps) / len(y))


def metrics(y: np.ndarray, p: np.ndarray) -> Metrics:
    """All headline metrics; AUC-based ones are NaN when only one class is present."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    both = 0 < y.sum() < len(y)
    auc = float(roc_auc_score(y, p)) if both else float("nan")
    if both:
        fpr, tpr, _ = roc_curve(y, p)
        ks = float(np.max(tpr - fpr))
    else:
        ks = float("nan")
    return Metrics(
        n=len(y),
        positives=int(y.sum()),
        rate=float(y.mean()) if len(y) else float("nan"),
        auc=auc,
        gini=2 * auc - 1,
        ks=ks,
        pr_auc=float(average_precision_score(y, p)) if both else float("nan"),
        brier=float(brier_score_loss(y, p)) if len(y) else float("nan"),
        ece=expected_calibration_error(y, p),
    )


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pl.DataFrame:
    """Per score decile: count, mean predicted, observed rate (the reliability diagram's data)."""
    frame = pl.DataFrame(
        {"y": np.asarray(y, dtype=np.float64), "p": np.asarray(p, dtype=np.float64)}
    )
    frame = frame.with_columns(
        (pl.col("p").rank("ordinal") * bins / (frame.height + 1))
        .floor()
        .cast(pl.Int32)
        .alias("decile")
    )
    return (
        frame.group_by("decile")
        .agg(
            pl.len().alias("n"),
            pl.col("p").mean().alias("predicted"),
            pl.col("y").mean().alias("observed"),
        )
        .sort("decile")
    )


def metrics_by_segment(
    y: np.ndarray, p: np.ndarray, segments: dict[str, np.ndarray]
) -> pl.DataFrame:
    """One row per (segment, value): n, rate, AUC, ECE. Segments are arrays aligned with y."""
    rows = []
    for name, values in segments.items():
        values = np.asarray(values)
        for value in np.unique(values):
            mask = values == value
            m = metrics(np.asarray(y)[mask], np.asarray(p)[mask])
            rows.append(
                {
                    "segment": name,
                    "value": str(value),
                    "n": m.n,
                    "rate": m.rate,
                    "auc": m.auc,
                    "ece": m.ece,
                }
            )
    return pl.DataFrame(rows)


# ---------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")  # no display here, in CI, or inside a Dagster run
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.set_title(title)
    return fig, ax


def roc_plot(y: np.ndarray, scores: dict[str, np.ndarray], title: str) -> bytes:
    fig, ax = _figure(title)
    for name, p in scores.items():
        if 0 < np.sum(y) < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def calibration_plot(y: np.ndarray, scores: dict[str, np.ndarray], title: str) -> bytes:
    fig, ax = _figure(title)
    top = 0.0
    for name, p in scores.items():
        table = calibration_table(y, p)
        ax.plot(table["predicted"], table["observed"], marker="o", label=name)
        top = max(top, table["predicted"].max(), table["observed"].max())
    ax.plot([0, top], [0, top], color="grey", linestyle=":")
    ax.set_xlabel("mean predicted probability (decile)")
    ax.set_ylabel("observed rate")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def score_distribution_plot(y: np.ndarray, p: np.ndarray, title: str) -> bytes:
    fig, ax = _figure(title)
    bins = np.linspace(0, max(float(np.max(p)), 1e-6), 40)
    y = np.asarray(y)
    ax.hist(p[y == 0], bins=bins, alpha=0.6, density=True, label="negatives")
    ax.hist(p[y == 1], bins=bins, alpha=0.6, density=True, label="positives")
    ax.set_xlabel("predicted probability")
    ax.legend(fontsize=8)
    return _png(fig)


def learning_curve_plot(history: list[dict], title: str = "sequence encoder") -> bytes:
    """Training and validation loss per epoch, and validation AUC per task on a second axis."""
    fig, ax = _figure(title)
    epochs = [row["epoch"] for row in history]
    for key in ("train_loss", "valid_loss"):
        if all(key in row for row in history):
            ax.plot(epochs, [row[key] for row in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    right = ax.twinx()
    for key in sorted({k for row in history for k in row if k.startswith("valid_auc_")}):
        right.plot(epochs, [row.get(key, np.nan) for row in history], linestyle="--", label=key)
    right.set_ylabel("validation AUC")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    return _png(fig)


def compare(
    table: pl.DataFrame,
    scores: dict[str, dict[str, np.ndarray]],
    tasks: list[str],
    segments: dict[str, pl.Expr],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every model's metrics per task on the rows of `table` whose label is known, and per segment.

    `scores`: model -> task -> probabilities aligned with `table`. Returns (metrics: one row per
    model and task; segment metrics: one row per model, task, segment and value)."""
    rows, segment_rows = [], []
    seg_values = table.select(**segments) if segments else None
    for task in tasks:
        known = table[task].is_not_null().to_numpy()
        y = table[task].to_numpy()[known].astype(np.int64)
        for model, by_task in scores.items():
            if task not in by_task:
                continue
            p = np.asarray(by_task[task], dtype=np.float64)[known]
            rows.append({"model": model, "task": task, **metrics(y, p).as_dict()})
            if seg_values is not None:
                seg = metrics_by_segment(
                    y, p, {c: seg_values[c].to_numpy()[known] for c in seg_values.columns}
                )
                segment_rows.append(
                    seg.with_columns(pl.lit(model).alias("model"), pl.lit(task).alias("task"))
                )
    segment_table = (
        pl.concat(segment_rows)
        if segment_rows
        else pl.DataFrame(schema={"model": pl.String, "task": pl.String})
    )
    return pl.DataFrame(rows), segment_table
