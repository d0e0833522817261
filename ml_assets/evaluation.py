"""Group `evaluation`: out-of-time metrics for every model on the same test rows, and the
promotion decision that moves the MLflow `champion` alias."""

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from eventml.evaluate import calibration_plot, compare, roc_plot, score_distribution_plot
from eventml.promotion import AUDIT_SCHEMA, decide
from eventml.risk_model import RiskModel, model_table
from eventml.scorer import Scorer
from eventml.sources import DAY
from ml_assets.metadata import png_md, table_md
from ml_assets.models import REGISTERED_MODEL
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking


def _champion_scores(
    mlflow_tracking, challenger_version, test, decisions, raw_events, log
) -> tuple[str | None, dict]:
    """The current champion (if it is not the challenger itself) scored on the same test rows
    with its own encoder and scorer."""
    champion = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "champion")
    if champion is None or str(champion.version) == str(challenger_version):
        return None, {}
    with tempfile.TemporaryDirectory() as tmp:
        model = RiskModel.load(
            mlflow_tracking.download(REGISTERED_MODEL, str(champion.version), Path(tmp))
        )
    log(
        f"scoring champion v{champion.version} on {test.height:,} test decisions with its own encoder"
    )
    rows = decisions.join(test.select("decision_id"), on="decision_id")
    embeddings = model.embed_decisions(raw_events.drop(DAY).collect(), rows)
    # Scores must line up with `test`'s labels row for row; the challenger's encoder columns
    # make way for the champion's own (a join would keep both and the scorer read the first).
    own = [c for c in embeddings.columns if c != "decision_id"]
    scored = test.drop(own, strict=False).join(
        embeddings, on="decision_id", how="left", maintain_order="left"
    )
    return str(champion.version), {task: p for task, p in model.scorer.predict(scored).items()}


@dg.asset(group_name="evaluation")
def model_evaluation(
    context: dg.AssetExecutionContext,
    training_splits: pl.DataFrame,
    decision_features: pl.DataFrame,
    decision_embeddings: pl.DataFrame,
    decisions: pl.DataFrame,
    raw_events: pl.LazyFrame,
    baseline_scorer: Scorer,
    risk_scorer: RiskModel,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
) -> pl.DataFrame:
    """Out-of-time test metrics (AUC, Gini, KS, PR AUC, Brier, ECE) for the challenger, the
    features-only baseline, the encoder alone, the current champion and the simulator's oracle."""
    tasks = risk_scorer.tasks
    test = model_table(
        training_splits.filter(pl.col("split") == "test"), decision_features, decision_embeddings
    )
    challenger = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "challenger")
    scores = {
        "challenger": risk_scorer.scorer.predict(test),
        "baseline": baseline_scorer.predict(test),
        "encoder_only": {t: test[f"encoder_{t}"].to_numpy() for t in tasks},
    }
    champion_version, champion_scores = _champion_scores(
        mlflow_tracking, challenger.version, test, decisions, raw_events, context.log.info
    )
    if champion_scores:
        scores["champion"] = champion_scores
    pack = event_source.spec()
    oracle = {t: test[c].to_numpy() for t, c in pack.oracle.items() if t in tasks}
    if oracle:
        scores["oracle"] = oracle
    table, by_segment = compare(test, scores, tasks, {x.name: x.expr() for x in pack.segments})
    table = table.with_columns(
        pl.lit(str(challenger.version)).alias("challenger_version"),
        pl.lit(champion_version, dtype=pl.String).alias("champion_version"),
    )

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
    client = mlflow_tracking.client()
    for row in table.filter(pl.col("model") != "oracle").iter_rows(named=True):
        for metric in ("auc", "gini", "ks", "pr_auc", "brier", "ece"):
            if row["model"] == "challenger":
                client.log_metric(challenger.run_id, f"test.{row['task']}.{metric}", row[metric])
    for name, png in plots.items():
        client.log_image(challenger.run_id, _image(png), artifact_file=f"evaluation/{name}.png")
    _log_reference(client, challenger.run_id, test, scores["challenger"], risk_scorer)

    lift = {task: _auc(table, "challenger", task) - _auc(table, "baseline", task) for task in tasks}
    context.add_output_metadata(
        {
            "comparison": table_md(
                table.select(
                    "model", "task", "n", "rate", "auc", "gini", "ks", "pr_auc", "brier", "ece"
                ),
                max_rows=20,
            ),
            **{f"embedding_lift_auc.{t}": round(v, 4) for t, v in lift.items()},
            **{
                f"oracle_gap_auc.{t}": round(
                    _auc(table, "oracle", t) - _auc(table, "challenger", t), 4
                )
                for t in oracle
            },
            "by_segment": table_md(by_segment.filter(pl.col("model") == "challenger"), max_rows=20),
            **{name: png_md(png) for name, png in plots.items()},
            "challenger_version": str(challenger.version),
            "champion_version": champion_version or "none",
        }
    )
    return table


REFERENCE_ROWS = 10_000
REFERENCE_ARTIFACT = "monitoring/reference.parquet"


def _log_reference(client, run_id: str, test: pl.DataFrame, scores: dict, model: RiskModel):
    """What monitoring compares production against: a sample of the test decisions this model
    is judged (and maybe promoted) on, with its features and its own scores."""
    reference = test.select("decision_id", "ts", *model.feature_set.names).with_columns(
        pl.Series(f"p_{t}", np.asarray(p, dtype=np.float64)) for t, p in scores.items()
    )
    reference = reference.sample(min(REFERENCE_ROWS, reference.height), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        reference.write_parquet(path)
        client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))


def _auc(table: pl.DataFrame, model: str, task: str) -> float:
    found = table.filter((pl.col("model") == model) & (pl.col("task") == task))["auc"]
    return float(found[0]) if found.len() else float("nan")


def _image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))


class PromotionSettings(dg.Config):
    """One run's overrides of the dataset pack's `promotion`; unset fields keep the pack's."""

    task: str | None = None
    min_auc_gain: float | None = None
    max_ece: float | None = None


def _metrics_of(evaluation: pl.DataFrame, model: str) -> dict[str, dict[str, float]] | None:
    rows = evaluation.filter(pl.col("model") == model)
    return {
        r["task"]: {"auc": r["auc"], "ece": r["ece"]} for r in rows.iter_rows(named=True)
    } or None


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
    challenger = _metrics_of(model_evaluation, "challenger")
    incumbent = _metrics_of(model_evaluation, "champion")
    # Upstream blocking checks stop the run before this asset, so reaching here means they passed.
    verdict = decide(challenger, incumbent, rules, upstream_checks_passed=True)
    version = model_evaluation["challenger_version"][0]
    before = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "champion")
    before = str(before.version) if before else None
    if verdict.promote:
        mlflow_tracking.client().set_registered_model_alias(REGISTERED_MODEL, "champion", version)
    after = version if verdict.promote else before
    entry = pl.DataFrame(
        [
            {
                "decided_at": datetime.now(UTC),
                "action": "promoted" if verdict.promote else "refused",
                "challenger_version": version,
                "champion_before": before,
                "champion_after": after,
                "reasons": "; ".join(verdict.reasons),
                "metrics": json.dumps({"challenger": challenger, "champion": incumbent}),
                "dagster_run_id": context.run_id,
            }
        ],
        schema=AUDIT_SCHEMA,
    )
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
    champion_metrics = challenger if verdict.promote else incumbent
    within = champion_metrics is not None and all(
        m["ece"] <= rules.max_ece for m in champion_metrics.values()
    )
    yield dg.AssetCheckResult(
        check_name="champion_within_bounds",
        passed=bool(within),
        description=f"champion v{after}: calibration error within {rules.max_ece} on every task"
        if within
        else "the serving champion is missing or out of its calibration bounds",
    )
