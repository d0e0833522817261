"""Group `models`: the sequence encoders (one per fold of people), their outputs, and the scorers
(features only, and features + the encoders' cross-fitted probabilities). Each training asset
logs one MLflow run with its lineage."""

import tempfile

import dagster as dg
import mlflow
import polars as pl

from eventml.embedding import (
    SequenceModel,
    SequenceModelConfig,
    config_dict,
    train_sequence_model,
)
from eventml.encoder_data import EventTable
from eventml.evaluate import learning_curve_plot
from eventml.risk_model import DecisionPolicy, RiskModel, model_table
from eventml.scorer import Scorer, ScorerConfig
from ml_assets.metadata import lineage, png_md
from ml_assets.settings import settings_of
from resources.compute import CPU_POOL, Compute
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking

REGISTERED_MODEL = "eventml-risk"


EncoderSettings = settings_of(
    SequenceModelConfig, "EncoderSettings", "The sequence encoder's shape and training."
)
ScorerSettings = settings_of(
    ScorerConfig,
    "ScorerSettings",
    "XGBoost's settings for both scorers; the monotone constraints are the dataset pack's.",
    exclude=("monotone",),
)


@dg.asset(
    group_name="models",
    pool=CPU_POOL,
    io_manager_key="model_io_manager",
    metadata={"model_class": "sequence_model"},
    deps=["raw_events"],
)
def sequence_encoder(
    context: dg.AssetExecutionContext,
    config: EncoderSettings,
    training_splits: pl.DataFrame,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
    tables: DeltaTables,
    compute: Compute,
) -> SequenceModel:
    """Multi-task Transformers over each decision's prior events, one per fold of people
    (`training_splits`' `fold`): default and fraud on the train rows of the fold's people,
    30-day outlook targets (which events each person has in the month after a decision) on
    train and gap histories up to the test window, none from a person whose labels another fold
    learns or who has a valid row, and a masked-event task on every history."""
    settings = config.make()
    with mlflow_tracking.start_run(
        "sequence_encoder", lineage(context, tables, ["raw_events", "training_splits"])
    ) as run:
        mlflow.log_params(config_dict(settings))
        spec = event_source.spec()
        # One version of the events for this process and every worker that builds sequences.
        events = EventTable(tables.uri("raw_events"), tables.version("raw_events"))
        model, results = train_sequence_model(
            events,
            training_splits,
            spec,
            settings,
            log=context.log.info,
            trainer=compute.encoder_trainer(),
        )
        for fold, result in enumerate(results):
            for row in result.history:
                mlflow.log_metrics(
                    {
                        f"fold{fold}.{k}": float(v)
                        for k, v in row.items()
                        if isinstance(v, int | float) and k != "epoch"
                    },
                    step=row["epoch"],
                )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(model.save(tmp)), "sequence_model")
    best = {}
    for fold, result in enumerate(results):
        row = result.history[result.best_epoch]
        best[f"fold{fold}.best_epoch"] = result.best_epoch
        best |= {f"fold{fold}.{k}": float(v) for k, v in row.items() if k.startswith("valid_auc_")}
    context.add_output_metadata(
        {
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_link(run.info.run_id)),
            "folds": len(results),
            **best,
            "parameters": model.num_params(),
            "outlook_targets": ", ".join(model.config.outlook) or "none",
            **{
                f"fold{fold}.learning_curve": png_md(
                    learning_curve_plot(result.history, f"sequence encoder, fold {fold}")
                )
                for fold, result in enumerate(results)
            },
            "compute": dg.MetadataValue.json(compute.describe()),
        }
    )
    return model


@dg.asset(group_name="models", pool=CPU_POOL, deps=["raw_events"])
def decision_embeddings(
    context: dg.AssetExecutionContext,
    sequence_encoder: SequenceModel,
    training_splits: pl.DataFrame,
    tables: DeltaTables,
    compute: Compute,
) -> pl.DataFrame:
    """The encoders' embedding of every decision (every fold's side by side) and their
    probability per task, cross-fitted: every decision of a person takes the encoders of the
    folds that never learned that person's labels, as the person's live decisions do."""
    # One version of the events for this process and every worker.
    events_uri, version = tables.uri("raw_events"), tables.version("raw_events")
    table = compute.embeddings(sequence_encoder, events_uri, version, training_splits)
    context.add_output_metadata(
        {
            "dagster/row_count": table.height,
            "dimensions": sequence_encoder.config.emb_dim * len(sequence_encoder.encoders),
            "compute": dg.MetadataValue.json(compute.describe()),
        }
    )
    return table


# Both scorers learn from every train row: the encoders' probabilities on them are cross-fitted.
SCORER_ROWS = pl.col("split") == "train"


def _fit(
    context,
    splits: pl.LazyFrame,
    inputs: list[pl.LazyFrame],
    names: list[str],
    pack,
    config: ScorerSettings,
    compute: Compute,
) -> Scorer:
    # Only the rows the scorer learns and early-stops on are read from the tables.
    scorer_and_valid = splits.filter(SCORER_ROWS | (pl.col("split") == "valid")).collect()
    table = model_table(scorer_and_valid, *inputs)
    return Scorer.fit(
        table.filter(SCORER_ROWS),
        table.filter(pl.col("split") == "valid"),
        names,
        [label.name for label in pack.labels],
        config.make(monotone=pack.monotone),
        log=context.log.info,
        booster_trainer=compute.booster_trainer(),
    )


def _log_scorer_run(
    mlflow_tracking, scorer: Scorer, name: str, context, tables, artifact, artifact_path: str
) -> str:
    # The risk model bundles the encoder, so its lineage includes the events the encoder read.
    reads = ["raw_events", "training_splits", "decision_features", "decision_embeddings"]
    with mlflow_tracking.start_run(name, lineage(context, tables, reads)) as run:
        mlflow.log_params(
            {f"scorer.{k}": v for k, v in scorer.config.__dict__.items() if k != "monotone"}
        )
        mlflow.log_param("features", len(scorer.feature_names))
        mlflow.log_dict(scorer.config.monotone, "monotone_constraints.json")
        for task, booster in scorer.boosters.items():
            mlflow.log_metric(f"{task}.trees", booster.num_boosted_rounds())
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(artifact.save(tmp)), artifact_path)
    return run.info.run_id


@dg.asset(
    group_name="models",
    pool=CPU_POOL,
    io_manager_key="model_io_manager",
    metadata={"model_class": "scorer"},
)
def baseline_scorer(
    context: dg.AssetExecutionContext,
    config: ScorerSettings,
    training_splits: pl.LazyFrame,
    decision_features: pl.LazyFrame,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
    tables: DeltaTables,
    compute: Compute,
) -> Scorer:
    """XGBoost on point-in-time features only: trained the same way every time, so the lift the
    embeddings bring is always measured against it."""
    spec = event_source.spec()
    names = spec.feature_set().names
    scorer = _fit(context, training_splits, [decision_features], names, spec, config, compute)
    run_id = _log_scorer_run(
        mlflow_tracking, scorer, "baseline_scorer", context, tables, scorer, "scorer"
    )
    context.add_output_metadata(
        {
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_link(run_id)),
            "features": len(names),
            "compute": dg.MetadataValue.json(compute.describe()),
        }
    )
    return scorer


@dg.asset(
    group_name="models",
    pool=CPU_POOL,
    io_manager_key="model_io_manager",
    metadata={"model_class": "risk_model"},
)
def risk_scorer(
    context: dg.AssetExecutionContext,
    config: ScorerSettings,
    training_splits: pl.LazyFrame,
    decision_features: pl.LazyFrame,
    decision_embeddings: pl.LazyFrame,
    sequence_encoder: SequenceModel,
    event_source: EventSource,
    mlflow_tracking: MlflowTracking,
    tables: DeltaTables,
    compute: Compute,
) -> RiskModel:
    """XGBoost on features + the encoders' cross-fitted probability per task, bundled with its
    encoders and feature set as the risk model; registered in MLflow as the newest
    `challenger`."""
    spec = event_source.spec()
    feature_set = spec.feature_set()
    names = feature_set.names + sequence_encoder.probability_names
    inputs = [decision_features, decision_embeddings]
    scorer = _fit(context, training_splits, inputs, names, spec, config, compute)
    model = RiskModel(
        sequence_model=sequence_encoder,
        scorer=scorer,
        feature_set=feature_set,
        policy=DecisionPolicy(spec.policy),
    )
    run_id = _log_scorer_run(
        mlflow_tracking, scorer, "risk_scorer", context, tables, model, "risk_model"
    )
    version = mlflow_tracking.register(REGISTERED_MODEL, run_id, "risk_model", alias="challenger")
    context.add_output_metadata(
        {
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_link(run_id)),
            "registered_model": f"{REGISTERED_MODEL} v{version} (alias challenger)",
            "model_version": version,
            "features": len(names),
            "compute": dg.MetadataValue.json(compute.describe()),
        }
    )
    return model


@dg.asset(group_name="models", pool=CPU_POOL)
def decision_scores(
    context: dg.AssetExecutionContext,
    risk_scorer: RiskModel,
    training_splits: pl.DataFrame,
    decision_features: pl.DataFrame,
    decision_embeddings: pl.DataFrame,
    compute: Compute,
) -> pl.DataFrame:
    """The newest risk scorer's (the challenger's) probability per task for every decision,
    with its split: the batch scores backtests, threshold studies and audits read. A challenger
    the evaluation refuses is scored here too; the Bento serves the champion."""
    table = model_table(training_splits, decision_features, decision_embeddings)
    scores = compute.scores(risk_scorer.scorer, table)  # in the table's order
    means = {f"mean_{c}": float(scores[c].mean() or 0.0) for c in scores.columns[1:]}
    context.add_output_metadata(
        {
            "dagster/row_count": scores.height,
            **means,
            "compute": dg.MetadataValue.json(compute.describe()),
        }
    )
    return table.select("decision_id", "entity_id", "ts", "split").hstack(
        scores.drop("decision_id")
    )
