"""Group `monitoring`: what production saw and how it went, judged against the champion.

`prediction_log` is the Bento's own log (with the simulator, materializing it replays the days'
applications through the champion Bento: the time machine's traffic); `served_predictions`
ingests it; `feature_drift` and `live_performance` judge the champion and say, in their
metadata, whether it should be retrained. The sensors in `ml_assets.sensors` act on that.
"""

import tempfile
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from eventml.drift import (
    band,
    drift_plot,
    drift_table,
    drift_verdict,
    monitored_features,
    performance_verdict,
    psi,
)
from eventml.drift import live_performance as judge_live
from eventml.features import feature_set_for
from eventml.labels import build_decisions
from eventml.prediction_log import read_prediction_log
from eventml.sources import DAY
from eventml.traffic import replay
from ml_assets.evaluation import REFERENCE_ARTIFACT
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


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


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
        counts, served_by = replay(config.url, decisions), config.url
    else:
        version, _ = _champion(mlflow_tracking)
        bento = serving.bento_for(version)
        if bento is None:
            raise dg.Failure(f"no Bento serves champion v{version}: materialize risk_service_bento")
        with serving.serve(bento["tag"]) as url:
            counts, served_by = replay(url, decisions), bento["tag"]
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
    feature_set = feature_set_for(spec)
    names, monitored = feature_set.names, set(monitored_features(feature_set))
    scores = [f"p_{label.name}" for label in spec.labels]
    thresholds = monitoring.thresholds()
    first = start - timedelta(days=monitoring.window_days - 1)
    features = _window(tables.scan("decision_features"), first, end).collect()
    served = _window(tables.scan("served_predictions"), first, end)
    served = served.filter(pl.col("mlflow_version") == version).collect()

    rows, newest = [], None
    for day in _days(start, end):
        since = day - timedelta(days=monitoring.window_days - 1)
        current = features.filter(pl.col(DAY).is_between(since, day))
        if current.height < MIN_WINDOW_ROWS:
            context.log.info(f"{day}: {current.height} decisions in the window, not judged")
            continue
        table = drift_table(reference, current, names, thresholds=thresholds)
        scored = served.filter(pl.col(DAY).is_between(since, day))
        score_psi = {
            c.removeprefix("p_"): psi(reference[c].to_numpy(), scored[c].to_numpy())
            for c in scores
            if scored.height >= MIN_WINDOW_ROWS
        }
        newest = (day, current.height, scored.height, table, score_psi)
        score_rows = pl.DataFrame(
            {
                "column": [f"p_{t}" for t in score_psi],
                "psi": list(score_psi.values()),
                "band": [band(v, thresholds) for v in score_psi.values()],
            },
            schema={"column": pl.String, "psi": pl.Float64, "band": pl.String},
        )
        rows.append(
            pl.concat([table, score_rows], how="diagonal_relaxed").with_columns(
                pl.lit(day).alias(DAY),
                pl.col("column").is_in([*monitored, *(f"p_{t}" for t in score_psi)]).alias("monitored"),
                pl.lit(current.height).alias("decisions"),
                pl.lit(version).alias("champion_version"),
            )
        )  # fmt: skip
    out = pl.concat(rows) if rows else pl.DataFrame(schema={DAY: pl.Date, "column": pl.String})
    if newest is None:
        context.add_output_metadata({"judged": False, "champion_version": version})
        return out
    # The verdict is the newest day's: what the sensors act on.
    day, n_features, n_scored, table, score_psi = newest
    judged = table.filter(pl.col("column").is_in(list(monitored)))
    retrain, reasons, figures = drift_verdict(judged, score_psi or None, thresholds)
    context.add_output_metadata(
        {
            "as_of": day.isoformat(),
            "judged": True,
            "champion_version": version,
            "retrain_recommended": retrain,
            "reasons": "; ".join(reasons),
            "decisions_in_window": n_features,
            "scored_in_window": n_scored,
            **{f"score_psi.{t}": round(v, 4) for t, v in score_psi.items()},
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
    decisions = build_decisions(events, spec, as_of=_midnight(end))
    reference = {t: run.data.metrics.get(f"test.{t}.auc") for t in tasks}
    rows, retrain, reasons = [], False, []
    for day in _days(start, end):
        as_of = _midnight(day + timedelta(days=1))
        for task in tasks:
            live = judge_live(decisions, scores, task, live_since, as_of)
            if reference[task] is None:
                fires, why = False, [f"{task}: the champion's run has no test AUC to compare"]
            else:
                fires, why = performance_verdict(
                    live, reference[task], monitoring.max_auc_drop,
                    min_labels=monitoring.min_labels, min_positives=monitoring.min_positives,
                )  # fmt: skip
            rows.append({DAY: day, **live, "reference_auc": reference[task], "retrain": fires})
            if day == end - timedelta(days=1):
                retrain, reasons = retrain or fires, reasons + why
    table = pl.DataFrame(rows).with_columns(pl.lit(version).alias("champion_version"))
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
