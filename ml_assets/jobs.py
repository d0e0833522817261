"""Jobs: each names what it refreshes."""

import dagster as dg

from ml_assets.partitions import daily

ingest_job = dg.define_asset_job(
    "ingest_job",
    # The days only: the reference tables are unpartitioned, materialized by `references_job`
    # (the reference-files sensor runs it when their files change; `make demo` before the days).
    selection=dg.AssetSelection.groups("ingest") - dg.AssetSelection.assets("references"),
    partitions_def=daily,
    description="Validate a range of days from the event source into raw_events and event_rejects.",
)

references_job = dg.define_asset_job(
    "references_job",
    selection=dg.AssetSelection.assets("references"),
    description="Validate the pack's reference tables from their files (or the simulated world).",
)

# Features are daily partitions kept current as days arrive (the time machine, the landing
# zone sensor, automation); a retrain rebuilds everything that learns from them, in order.
RETRAIN = (
    "decisions", "training_splits", "sequence_encoder", "decision_embeddings", "baseline_scorer",
    "risk_scorer", "decision_scores", "model_evaluation", "champion", "risk_service_bento",
)  # fmt: skip
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(*RETRAIN),
    description="Retrain on the newest matured labels: encoder -> scorers -> out-of-time "
    "evaluation -> promotion -> a new Bento if the champion changed.",
)

# One step of the world: a range of days arrives, is served live, and is judged.
TIME_MACHINE = (
    "raw_events", "event_rejects", "online_store", "decision_features", "prediction_log",
    "served_predictions", "feature_drift", "live_performance",
)  # fmt: skip
time_machine_job = dg.define_asset_job(
    "time_machine_job",
    selection=dg.AssetSelection.assets(*TIME_MACHINE),
    partitions_def=daily,
    description="Advance the simulated world over a range of days: ingest them, update the "
    "online store and features, send the days' applications to the champion Bento, ingest its "
    "prediction log, and judge drift and live performance (`make advance DAYS=n`).",
)

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 3 * * 1",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    tags={"eventml/trigger": "schedule"},
    description="Retrain every Monday 03:00 whatever the monitors say (off by default: the "
    "drift and performance sensors retrain when there is a reason to).",
)
