"""Group `monitoring`: what production saw and how it went, judged against the champion.

`prediction_log` is the Bento's own log (with the simulator, materializing it replays the days'
applications through the champion Bento: the time machine's traffic); `served_predictions`
ingests it; `feature_drift` and `live_performance` judge the champion and say, in their
metadata, whether it should be retrained. The sensors in `ml_assets.sensors` act on that.
"""

import tempfile
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from eventml.drift import drift_by_day, drift_plot, drift_verdict, monitored_features
from eventml.labels import build_decisions
from eventml.performance import performance_by_day
from eventml.prediction_log import read_prediction_log
from eventml.report import REFERENCE_ARTIFACT
from eventml.sources import DAY, midnight
from eventml.traffic import replay
from ml_assets.metadata import counts_md, png_md, table_md
from ml_assets.models import REGISTERED_MODEL
from ml_assets.partitions import daily, run_days
from resources.bento import Serving
from resources.delta import DeltaTables
from resources.monitoring import Monitoring
from resources.sources import EventSource
from resources.tracking import MlflowTracking

# Every monitoring asset is a daily partition; a multi-day run is one run (the time machine's).
DAILY = {
    "group_name": "monitoring",
    "partitions_def": daily,
    "backfill_policy": dg.BackfillPolicy.single_run(),
}
# Fewer decisions than this in a drift window is noise, not evidence: the day is not judged.
MIN_WINDOW_ROWS = 100


def _champion(mlflow_tracking: MlflowTracking):
    found = mlflow_tracking.run_of(REGISTERED_MODEL, "champion")
    if found is None:
        raise dg.Failure(f"{REGISTERED_MODEL} has no champion: materialize `champion` first")
    return found


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days)]


class TrafficSettings(dg.Config):
    # A running service to send the days' applications to (e.g. `make serve`'s); empty: start
    # the champion's Bento for this run and stop it after.
    url: str = ""


@dg.asset(
    **DAILY,
    deps=["online_store", "risk_service_bento"],
)
def prediction_log(
    context: dg.AssetExecutionContext,
    config: TrafficSettings,
    tables: DeltaTables,
    serving: Serving,
    mlflow_tracking: MlflowTracking,
    event_source: EventSource,
):
    """The Bento's prediction log (JSON lines under `$EVENTML_HOME/predictions`). In production
    the service writes it as it serves; materializing it here sends the days' applications to
    the champion Bento as live traffic, each with the history the online store holds before it
    (the time machine's production)."""
    start, end = run_days(context)
    spec = event_source.spec()
    decisions = (
        tables.scan("raw_events")
        .filter(
            (pl.col(DAY) >= start)
            & (pl.col(DAY) < end)
            & pl.col("event_type").is_in(spec.decision_event_types)
        )
        .collect()
    )
    if config.url:
        counts, served_by = replay(config.url, decisions, spec), config.url
    else:
        version, _ = _champion(mlflow_tracking)
        bento = serving.bento_for(version)
        if bento is None:
            raise dg.Failure(f"no Bento serves champion v{version}: materialize risk_service_bento")
        # The requests the champion understands: its own pack's fields, whatever the
        # deployment's pack has become since it was trained.
        with serving.serve(bento["tag"]) as url:
            counts, served_by = replay(url, decisions, serving.served_pack(bento)), bento["tag"]
    context.log.info(f"{start}..{end}: {counts['sent']:,} applications scored by {served_by}")
    return dg.MaterializeResult(
        metadata={**counts, "served_by": served_by, "log": serving.prediction_log}
    )


@dg.asset(
    **DAILY,
    deps=["prediction_log"],
    metadata={"partition_expr": DAY},
)
def served_predictions(
    context: dg.AssetExecutionContext,
    serving: Serving,
    tables: DeltaTables,
    event_source: EventSource,
) -> pl.DataFrame:
    """Every logged prediction for decisions on these days, validated: one row per request.
    Lines that are not well-formed records go to the `prediction_rejects` table with a reason."""
    start, end = run_days(context)
    tasks = [label.name for label in event_source.spec().labels]
    predictions, rejects = read_prediction_log(serving.prediction_log, tasks, start, end)
    rejects_version = tables.overwrite("prediction_rejects", rejects)
    context.add_output_metadata(
        {
            "dagster/row_count": predictions.height,
            "by_model_version": counts_md(predictions, "mlflow_version"),
            "rejects_in_log": rejects.height,
            "rejects_by_reason": counts_md(rejects, "reason"),
            "prediction_rejects_version": rejects_version,
            "preview": table_md(predictions),
        }
    )
    return predictions.with_columns(pl.col("decision_ts").dt.date().alias(DAY))


def _reference(mlflow_tracking: MlflowTracking, run_id: str) -> pl.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow_tracking.download_run_artifact(run_id, REFERENCE_ARTIFACT, Path(tmp))
        return pl.read_parquet(path)


def _window(frame: pl.LazyFrame, first: date, last: date) -> pl.LazyFrame:
    return frame.filter((pl.col(DAY) >= first) & (pl.col(DAY) <= last))


@dg.asset(
    **DAILY,
    deps=["served_predictions", "decision_features"],
    metadata={"partition_expr": DAY},
)
def feature_drift(
    context: dg.AssetExecutionContext,
    tables: DeltaTables,
    mlflow_tracking: MlflowTracking,
    monitoring: Monitoring,
    event_source: EventSource,
) -> pl.DataFrame:
    """Per day: PSI and KS of every feature over the trailing window of decisions, and of each
    task's served score, against the champion's reference sample. The metadata judges the
    newest day: whether the drift is enough to retrain, and why."""
    start, end = run_days(context)
    version, run = _champion(mlflow_tracking)
    reference = _reference(mlflow_tracking, run.info.run_id)
    spec = event_source.spec()
    feature_set = spec.feature_set()
    monitored = set(monitored_features(feature_set))
    first = start - timedelta(days=monitoring.window_days - 1)
    features = _window(tables.scan("decision_features"), first, end).collect()
    served = _window(tables.scan("served_predictions"), first, end)
    served = served.filter(pl.col("mlflow_version") == version).collect()
    out, newest = drift_by_day(
        reference, features, served, _days(start, end),
        columns=feature_set.names, monitored=monitored, tasks=[x.name for x in spec.labels],
        window_days=monitoring.window_days, thresholds=monitoring.thresholds(),
        min_rows=MIN_WINDOW_ROWS, log=context.log.info,
    )  # fmt: skip
    if newest is None:
        context.add_output_metadata({"judged": False, "champion_version": version})
        return out
    out = out.with_columns(pl.lit(version).alias("champion_version"))
    # The verdict is the newest day's: what the sensors act on.
    thresholds = monitoring.thresholds()
    judged = newest.table.filter(pl.col("column").is_in(list(monitored)))
    retrain, reasons, figures = drift_verdict(judged, newest.score_psi or None, thresholds)
    context.add_output_metadata(
        {
            "as_of": newest.day.isoformat(),
            "judged": True,
            "champion_version": version,
            "retrain_recommended": retrain,
            "reasons": "; ".join(reasons),
            "decisions_in_window": newest.decisions,
            "scored_in_window": newest.scored,
            **{f"score_psi.{t}": round(v, 4) for t, v in newest.score_psi.items()},
            "features_act": figures["features_act"],
            "features_watch": figures["features_watch"],
            "worst_feature": figures["worst_feature"] or "",
            "worst_psi": round(figures["worst_psi"] or 0.0, 4),
            "worst_features": table_md(judged.select("column", "psi", "band", "ks_statistic"), 15),
            "drift_plot": png_md(drift_plot(judged, thresholds=thresholds)),
        }
    )
    return out


@dg.asset(
    **DAILY,
    deps=["served_predictions", "raw_events"],
    metadata={"partition_expr": DAY},
)
def live_performance(
    context: dg.AssetExecutionContext,
    tables: DeltaTables,
    mlflow_tracking: MlflowTracking,
    monitoring: Monitoring,
    event_source: EventSource,
) -> pl.DataFrame:
    """Per day and task, the champion's AUC and calibration on the decisions it served whose
    labels had matured by the end of that day (a 90-day label is judged 90 days after the
    decision, never earlier), against the AUC it was promoted on. Pending labels are counted."""
    start, end = run_days(context)
    version, run = _champion(mlflow_tracking)
    spec = event_source.spec()
    tasks = [label.name for label in spec.labels]
    served = (
        tables.scan("served_predictions")
        .filter((pl.col(DAY) < end) & (pl.col("mlflow_version") == version))
        .collect()
    )
    if served.height == 0:
        context.add_output_metadata({"judged": False, "champion_version": version,
                                     "reasons": f"nothing served by champion v{version} yet"})  # fmt: skip
        return pl.DataFrame(schema={DAY: pl.Date, "task": pl.String})
    live_since = served["decision_ts"].min()
    scores = (
        served.filter(pl.col("decision_id").is_not_null())
        .sort("served_at")
        .unique("decision_id", keep="last")
        .select("decision_id", *(f"p_{t}" for t in tasks))
    )
    entities = served["entity_id"].unique().implode()
    events = (
        tables.scan("raw_events")
        .filter((pl.col(DAY) < end) & pl.col("entity_id").is_in(entities))
        .drop(DAY)
        .collect()
    )
    decisions = build_decisions(events, spec, as_of=midnight(end))
    reference = {t: run.data.metrics.get(f"test.{t}.auc") for t in tasks}
    table, retrain, reasons = performance_by_day(
        decisions, scores, tasks, reference, live_since, _days(start, end),
        max_auc_drop=monitoring.max_auc_drop, min_labels=monitoring.min_labels,
        min_positives=monitoring.min_positives,
    )  # fmt: skip
    table = table.with_columns(pl.lit(version).alias("champion_version"))
    newest = table.filter(pl.col(DAY) == end - timedelta(days=1))
    context.add_output_metadata(
        {
            "as_of": (end - timedelta(days=1)).isoformat(),
            "judged": True,
            "champion_version": version,
            "live_since": live_since.isoformat(),
            "retrain_recommended": retrain,
            "reasons": "; ".join(reasons),
            **{f"auc.{r['task']}": r["auc"] for r in newest.iter_rows(named=True)},
            **{f"matured.{r['task']}": r["n"] for r in newest.iter_rows(named=True)},
            **{f"pending.{r['task']}": r["pending"] for r in newest.iter_rows(named=True)},
            "performance": table_md(
                newest.select(
                    "task",
                    "n",
                    "positives",
                    "pending",
                    "auc",
                    "reference_auc",
                    "ece",
                    "observed_rate",
                    "mean_predicted",
                )  # fmt: skip
            ),
        }
    )
    return table
