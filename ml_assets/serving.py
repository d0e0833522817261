"""Group `serving`: the online store the service reads histories from, and the Bento of the
current champion, which must serve exactly the offline scores before it counts as built."""

import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from eventml.features import key_activity
from eventml.risk_model import RiskModel
from eventml.sources import DAY, midnight
from eventml.traffic import score_requests
from ml_assets.ingest import stored_references
from ml_assets.metadata import table_md
from ml_assets.models import REGISTERED_MODEL
from ml_assets.partitions import daily, run_days
from resources.bento import Serving
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking

PARITY_SAMPLE = 50
PARITY_TOLERANCE = 1e-6  # absolute, on every task's probability


@dg.asset(
    group_name="serving",
    partitions_def=daily,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["raw_events"],
    # New days of events refresh these partitions without anyone asking (the automation sensor).
    automation_condition=dg.AutomationCondition.eager(),
)
def online_store(
    context: dg.AssetExecutionContext,
    tables: DeltaTables,
    event_source: EventSource,
    serving: Serving,
):
    """Each entity's events, for scoring live requests: the run's days of `raw_events` replace
    whatever the store held for those days in one transaction, so re-running is idempotent and
    a live request never sees the days missing."""
    start, end = run_days(context)
    events = (
        tables.scan("raw_events")
        .filter((pl.col(DAY) >= start) & (pl.col(DAY) < end))
        .drop(DAY)
        .collect()
    )
    spec = event_source.spec()
    store = serving.store(spec)
    # Keyed families' activity of the same days; labels maturing on them read a horizon before.
    before_end = tables.scan("raw_events").filter(pl.col(DAY) < end).drop(DAY)
    activity = key_activity(before_end, spec, spec.feature_set(), start, end)
    # The reference tables whole, for the requests' own decisions and recent events.
    references = stored_references(tables, spec)
    deleted = store.replace_between(midnight(start), midnight(end), events, activity, references)
    written = events.height
    context.log.info(f"{start}..{end}: replaced {deleted:,} stored events with {written:,}")
    return dg.MaterializeResult(
        metadata={
            "path": serving.online_store,
            "events_deleted": deleted,
            "events_written": written,
            "key_activity_rows": activity.height,
            "reference_rows": sum(rows.height for rows in references.values()),
            **store.stats(),
        }
    )


def served_vs_offline(serving: Serving, bento_tag: str, model: RiskModel, events: pl.DataFrame,
                      decisions: pl.DataFrame, features: pl.DataFrame, spec,
                      activity: pl.DataFrame,
                      references: dict[str, pl.DataFrame]) -> pl.DataFrame:  # fmt: skip
    """Per decision and task: the offline probability (`score_tables` on the batch features and
    the model's own embeddings) and the one the built Bento serves over HTTP, from an online
    store holding exactly these entities' events, the keys' `activity` and the `references`."""
    import bentoml  # only the client: the stores are the child processes' (resources.bento)

    offline = model.score_tables(features, model.embed_decisions(events, decisions))
    with tempfile.TemporaryDirectory() as tmp:
        store = Serving.under(Path(tmp)).store(spec)
        store.write(events.filter(pl.col("entity_id").is_in(decisions["entity_id"].implode())))
        store.write_activity(activity)
        for name, rows in references.items():
            store.write_references(name, rows)
        with serving.serve(
            bento_tag, online_store=store.location, prediction_log=f"{tmp}/predictions"
        ) as url:
            with bentoml.SyncHTTPClient(url, timeout=60) as client:
                served = [client.score(request=r) for r in score_requests(decisions, spec)]
    rows = [
        {
            "decision_id": s["decision_id"],
            **{f"served_{t}": p for t, p in s["probabilities"].items()},
        }
        for s in served
    ]
    return offline.join(pl.DataFrame(rows), on="decision_id", how="left")


@dg.asset(
    group_name="serving",
    deps=["champion"],
    check_specs=[
        dg.AssetCheckSpec("served_equals_offline", asset="risk_service_bento", blocking=True)
    ],
)
def risk_service_bento(
    context: dg.AssetExecutionContext,
    serving: Serving,
    mlflow_tracking: MlflowTracking,
    tables: DeltaTables,
    event_source: EventSource,
):
    """The Bento of the MLflow champion: the model saved into the BentoML store (no pickle) and
    the service built around it, pinned to that exact model. Rebuilt only when the champion
    changes; either way the built Bento is started and must serve the offline scores."""
    champion = mlflow_tracking.version_by_alias(REGISTERED_MODEL, "champion")
    if champion is None:
        raise dg.Failure(f"{REGISTERED_MODEL} has no champion yet: materialize `champion` first")
    version, spec = str(champion.version), event_source.spec()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = mlflow_tracking.download(REGISTERED_MODEL, version, Path(tmp))
        built = serving.bento_for(version)
        if built is None:
            built = serving.publish(model_dir, spec.model_dump_json(), version)
            context.log.info(f"built {built['bento_tag']} for {REGISTERED_MODEL} v{version}")
        else:
            context.log.info(
                f"{built['tag']} already serves {REGISTERED_MODEL} v{version}: not rebuilt"
            )
            built = {"bento_tag": built["tag"], "model_tag": built["model_tag"], "reused": True}
        model = RiskModel.load(model_dir)

    test = tables.scan("training_splits").filter(pl.col("split") == "test").collect()
    sample = test.sample(min(PARITY_SAMPLE, test.height), seed=0)
    ids = sample["decision_id"].implode()
    features = tables.scan("decision_features").filter(pl.col("decision_id").is_in(ids)).collect()
    events = (
        tables.scan("raw_events")
        .filter(pl.col("entity_id").is_in(sample["entity_id"].implode()))
        .drop(DAY)
        .collect()
    )
    activity = spec.activity_for(tables.scan("raw_events").drop(DAY), sample)
    compared = served_vs_offline(
        serving, built["bento_tag"], model, events, sample, features, spec, activity,
        stored_references(tables, spec),
    )  # fmt: skip
    diffs = [(compared[f"p_{t}"] - compared[f"served_{t}"]).abs() for t in model.tasks]
    worst = (
        max((float(d.fill_null(np.inf).max()) for d in diffs), default=0.0)
        if compared.height
        else 0.0
    )

    yield dg.MaterializeResult(
        metadata={
            "bento_tag": built["bento_tag"],
            "model_tag": built["model_tag"],
            "mlflow_version": version,
            "rebuilt": not built.get("reused", False),
            "serve": f"make serve  # or: BENTOML_HOME={serving.home} bentoml serve {built['bento_tag']}",
        }
    )
    yield dg.AssetCheckResult(
        check_name="served_equals_offline",
        passed=bool(compared.height > 0 and worst <= PARITY_TOLERANCE),
        description=f"{compared.height} out-of-time decisions served by {built['bento_tag']}: "
        f"largest |served - offline| = {worst:.2e} (tolerance {PARITY_TOLERANCE})",
        metadata={
            "decisions": compared.height,
            "max_abs_diff": worst,
            "sample": table_md(compared, max_rows=5),
        },
    )
