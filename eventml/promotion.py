"""Champion/challenger: the rule that decides whether a new model goes to production, and the
audit trail that answers "which model was in production on date X"."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
from pydantic import BaseModel, ConfigDict


class PromotionRules(BaseModel):
    """A dataset pack's `promotion` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str | None = None  # the label whose AUC decides; None: the pack's first label
    # The challenger must reach the champion's AUC plus this (negative: may be slightly worse).
    min_auc_gain: float = 0.0
    max_ece: float = 0.05  # expected calibration error bound, for every task


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(
    challenger: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]] | None,
    rules: PromotionRules,
    upstream_checks_passed: bool = True,
) -> Verdict:
    """`challenger`/`champion`: task -> metrics (auc, ece) on the same test rows."""
    reasons = []
    if not upstream_checks_passed:
        reasons.append("an upstream blocking check failed")
    for task, m in challenger.items():
        if not m["ece"] <= rules.max_ece:
            reasons.append(f"{task} calibration error {m['ece']:.4f} exceeds {rules.max_ece}")
    auc = challenger[rules.task]["auc"]
    if math.isnan(auc):
        reasons.append(f"{rules.task} AUC is undefined on the test rows")
    if champion is not None:
        needed = champion[rules.task]["auc"] + rules.min_auc_gain
        if not auc >= needed:
            reasons.append(
                f"{rules.task} AUC {auc:.4f} does not reach the champion's {champion[rules.task]['auc']:.4f}"
                f" {rules.min_auc_gain:+.4f}"
            )
    if reasons:
        return Verdict(False, reasons)
    why = (
        "no champion yet"
        if champion is None
        else f"{rules.task} AUC {auc:.4f} beats the champion's {champion[rules.task]['auc']:.4f}"
    )
    return Verdict(True, [why])


AUDIT_SCHEMA = {
    "decided_at": pl.Datetime("us", "UTC"),
    "action": pl.String,  # promoted | refused
    "challenger_version": pl.String,
    "champion_before": pl.String,
    "champion_after": pl.String,
    "reasons": pl.String,
    "metrics": pl.String,  # JSON: challenger and champion metrics the decision used
    "dagster_run_id": pl.String,
}


def metrics_of(evaluation: pl.DataFrame, model: str) -> dict[str, dict[str, float]] | None:
    """task -> {auc, ece} of one model in an evaluation table (None: the model is not in it)."""
    rows = evaluation.filter(pl.col("model") == model).iter_rows(named=True)
    return {r["task"]: {"auc": r["auc"], "ece": r["ece"]} for r in rows} or None


def within_bounds(metrics: dict[str, dict[str, float]] | None, rules: PromotionRules) -> bool:
    """Whether the model that serves (its metrics) is calibrated within the rule on every task."""
    return metrics is not None and all(m["ece"] <= rules.max_ece for m in metrics.values())


def audit_entry(
    verdict: Verdict,
    challenger_version: str,
    champion_before: str | None,
    challenger: dict | None,
    champion: dict | None,
    dagster_run_id: str,
) -> pl.DataFrame:
    """One row of the audit trail (`AUDIT_SCHEMA`): what was decided, on which metrics, by
    which run."""
    after = challenger_version if verdict.promote else champion_before
    return pl.DataFrame(
        [
            {
                "decided_at": datetime.now(UTC),
                "action": "promoted" if verdict.promote else "refused",
                "challenger_version": challenger_version,
                "champion_before": champion_before,
                "champion_after": after,
                "reasons": "; ".join(verdict.reasons),
                "metrics": json.dumps({"challenger": challenger, "champion": champion}),
                "dagster_run_id": dagster_run_id,
            }
        ],
        schema=AUDIT_SCHEMA,
    )


def champion_on(audit: pl.DataFrame, when: datetime) -> str | None:
    """The champion model version in production at `when`, from the audit trail."""
    before = audit.filter(pl.col("decided_at") <= when).sort("decided_at")
    return before["champion_after"][-1] if before.height else None
