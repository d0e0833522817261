"""Group `evaluation`: out-of-time metrics for every model on the same test rows, and the
promotion decision that moves the MLflow `champion` alias."""

import tempfile
from pathlib import Path

import dagster as dg
import polars as pl

from eventml.promotion import audit_entry, decide, metrics_of, within_bounds
from eventml.report import out_of_time_report, reference_sample
from eventml.risk_model import RiskModel, model_table
from eventml.scorer import Scorer
from eventml.sources import DAY
from ml_assets.metadata import png_md, table_md
from ml_assets.models import REGISTERED_MODEL
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking


def _champion_scores(mlflow_tracking, challenger_version, test, decisions, raw_events, log):
    """The current champion (unless it is the challenger itself) scored on the same test rows
    with its own encoder: (version, task -> probabilities), or (None, {})."""
    champion = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "champion")
    if champion is None or str(champion.version) == str(challenger_version):
        return None, {}
    with tempfile.TemporaryDirectory() as tmp:
        model = RiskModel.load(
            mlflow_tracking.download(REGISTERED_MODEL, str(champion.version), Path(tmp))
        )
    log(f"scoring champion v{champion.version} on {test.height:,} test decisions, own encoder")
    rows = decisions.join(test.select("decision_id"), on="decision_id")
    return str(champion.version), model.scores_on(test, raw_events.drop(DAY).collect(), rows)


@dg.asset(group_name="evaluation")
def model_evaluation(
    context: dg.AssetExecutionContext,
    training_splits: pl.DataFrame,
    decision_features: pl.LazyFrame,
    decision_embeddings: pl.LazyFrame,
    decisions: pl.DataFrame,
    raw_events: pl.LazyFrame,
    baseline_scorer: Scorer,
    risk_scorer: RiskModel,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
) -> pl.DataFrame:
    """Out-of-time test metrics (AUC, Gini, KS, PR AUC, Brier, ECE) for the challenger, the
    features-only baseline, the encoder alone, the current champion and the simulator's oracle."""
    test = model_table(
        training_splits.filter(pl.col("split") == "test"), decision_features, decision_embeddings
    )
    challenger = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "challenger")
    scores = {
        "challenger": risk_scorer.scorer.predict(test),
        "baseline": baseline_scorer.predict(test),
        "encoder_only": {t: test[f"encoder_{t}"].to_numpy() for t in risk_scorer.tasks},
    }
    champion_version, champion_scores = _champion_scores(
        mlflow_tracking, challenger.version, test, decisions, raw_events, context.log.info
    )
    if champion_scores:
        scores["champion"] = champion_scores
    report = out_of_time_report(test, scores, event_source.spec())
    reference = reference_sample(test, scores["challenger"], risk_scorer.feature_set.names)
    mlflow_tracking.log_evaluation(challenger.run_id, report, reference)
    context.add_output_metadata(
        {
            "comparison": table_md(report.table.drop("positives", strict=False), max_rows=20),
            **{f"embedding_lift_auc.{t}": round(v, 4) for t, v in report.embedding_lift().items()},
            **{f"oracle_gap_auc.{t}": round(v, 4) for t, v in report.oracle_gap().items()},
            **{
                f"oracle_auc_open_outcomes.{t}": round(v, 4)
                for t, v in report.open_outcome_oracle.items()
            },  # fmt: skip
            "by_segment": table_md(
                report.by_segment.filter(pl.col("model") == "challenger"), max_rows=20
            ),
            **{name: png_md(png) for name, png in report.plots.items()},
            "challenger_version": str(challenger.version),
            "champion_version": champion_version or "none",
        }
    )
    return report.table.with_columns(
        pl.lit(str(challenger.version)).alias("challenger_version"),
        pl.lit(champion_version, dtype=pl.String).alias("champion_version"),
    )


class PromotionSettings(dg.Config):
    """One run's overrides of the dataset pack's `promotion`; unset fields keep the pack's."""

    task: str | None = None
    min_auc_gain: float | None = None
    max_ece: float | None = None


@dg.asset(
    group_name="evaluation",
    check_specs=[dg.AssetCheckSpec("champion_within_bounds", asset="champion", blocking=True)],
)
def champion(
    context: dg.AssetExecutionContext,
    config: PromotionSettings,
    model_evaluation: pl.DataFrame,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
    tables: DeltaTables,
):
    """Promote the challenger if it beats the champion's out-of-time AUC (by the configured
    margin) and is calibrated; otherwise keep the champion. Either way, append to the audit trail."""
    overrides = {k: v for k, v in config.model_dump().items() if v is not None}
    rules = event_source.spec().promotion_rules.model_copy(update=overrides)
    challenger = metrics_of(model_evaluation, "challenger")
    incumbent = metrics_of(model_evaluation, "champion")
    # Upstream blocking checks stop the run before this asset, so reaching here means they passed.
    verdict = decide(challenger, incumbent, rules, upstream_checks_passed=True)
    version = model_evaluation["challenger_version"][0]
    before = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "champion")
    before = str(before.version) if before else None
    if verdict.promote:
        mlflow_tracking.client().set_registered_model_alias(REGISTERED_MODEL, "champion", version)
    after = version if verdict.promote else before
    entry = audit_entry(verdict, version, before, challenger, incumbent, context.run_id)
    previous = tables.scan("champion")
    audit = pl.concat([previous.collect(), entry]) if previous is not None else entry
    context.log.info(f"challenger v{version}: {entry['action'][0]} ({entry['reasons'][0]})")
    yield dg.Output(
        audit,
        metadata={
            "action": entry["action"][0],
            "reasons": entry["reasons"][0],
            "champion_version": after or "none",
            "audit": table_md(audit.sort("decided_at", descending=True).drop("metrics")),
        },
    )
    within = within_bounds(challenger if verdict.promote else incumbent, rules)
    yield dg.AssetCheckResult(
        check_name="champion_within_bounds",
        passed=bool(within),
        description=f"champion v{after}: calibration error within {rules.max_ece} on every task"
        if within
        else "the serving champion is missing or out of its calibration bounds",
    )
