"""Sensors: files landed in the landing zone become ingest runs for the days they hold, and a
change to the reference tables' files a `references` run; the stream's complete days become
ingest runs, with the stream's lag and freshness observed on the assets it feeds; drift or
live-performance decay past the `monitoring` thresholds becomes a retrain, once per champion."""

import json
from datetime import date

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from eventml.home import StateHome
from eventml.landing import arrivals, reference_files_digest
from eventml.stream import EventStream
from ml_assets.jobs import ingest_job, references_job, retrain_job
from ml_assets.models import REGISTERED_MODEL
from ml_assets.partitions import PARTITION_DAYS, daily
from resources.delta import DeltaTables
from resources.monitoring import Monitoring
from resources.sources import EventSource
from resources.tracking import MlflowTracking


@dg.sensor(
    job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def landing_zone_sensor(context: dg.SensorEvaluationContext, event_source: EventSource):
    """Admit new files into the landing log; one run per landed file, over the days its rows
    are placed on. A file that cannot be read is quarantined and named here, and the others go
    on.

    The run_key is the file's content hash and the days that exist yet, so Dagster never
    launches a file twice, and a file with rows for a day still to come is run again when it
    comes. The cursor holds the keys requested; a landed file whose key is not in it is
    requested, so a tick that died after admitting a file still gets its run.
    """
    if event_source.kind != "landing":
        return dg.SkipReason(
            "event_source is the simulator; set EVENTML_SOURCE=landing to watch files"
        )
    for arrival in event_source.admit(PARTITION_DAYS):
        if arrival.status == "quarantined":
            context.log.warning(f"quarantined {arrival.name}: {arrival.reason}")
    requested = set(json.loads(context.cursor)) if context.cursor else set()
    existing = set(daily.get_partition_keys())
    requests = []
    for arrival in arrivals(event_source.landing_path, include_quarantined=False):
        days = [d for d in arrival.days if d in existing]
        run_key = f"{arrival.sha256}:{days[-1]}" if days else None
        if run_key is None or run_key in requested:
            continue
        requested.add(run_key)
        requests.append(
            dg.RunRequest(
                run_key=run_key,
                tags={
                    ASSET_PARTITION_RANGE_START_TAG: days[0],
                    ASSET_PARTITION_RANGE_END_TAG: days[-1],
                    "eventml/trigger": "landing_file",
                    "eventml/file": arrival.name,
                },
            )
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(sorted(requested)))


@dg.sensor(
    job=references_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def reference_files_sensor(context: dg.SensorEvaluationContext, event_source: EventSource):
    """A `references` run whenever the reference tables' files change (one added, replaced or
    removed under landing/references/<name>/). The run_key is their digest, so the same files
    are never run twice; the days already ingested keep the rows they were attached (ingest
    them again to attach a correction dated in the past)."""
    if event_source.kind != "landing":
        return dg.SkipReason("event_source is the simulator: `make demo` materializes references")
    spec = event_source.spec()
    if not spec.references:
        return dg.SkipReason(f"pack {spec.name!r} declares no reference tables")
    digest = reference_files_digest(event_source.landing_path, spec)
    if digest == context.cursor:
        return dg.SkipReason("no reference file changed")
    request = dg.RunRequest(run_key=digest, tags={"eventml/trigger": "reference_files"})
    return dg.SensorResult(run_requests=[request], cursor=digest)


@dg.sensor(
    job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def stream_sensor(
    context: dg.SensorEvaluationContext, event_source: EventSource, tables: DeltaTables
):
    """The stream's landed days into `raw_events`: one run per range of complete days whose
    landed rows changed since they were requested (a day is complete once the stream's event
    time is past its end, `event_source.stream_lateness_minutes`; an event landing later
    changes the day's count and asks for it again). The run_key is the range and its rows, so a
    range is never run twice for the same rows. Each tick also observes the stream on
    `online_store` (what the consumers serve) and `raw_events` (what they landed): backlog,
    throughput, freshness, and the newest complete day.
    """
    if event_source.kind != "stream":
        return dg.SkipReason(f"event_source is the {event_source.kind}; set EVENTML_SOURCE=stream")
    requested = {date.fromisoformat(d): n for d, n in json.loads(context.cursor or "{}").items()}
    landed = event_source.complete_stream_days(tables)
    changed = sorted(d for d, n in landed.items() if requested.get(d) != n)
    existing = set(daily.get_partition_keys())
    requests = []
    for days in _runs_of_consecutive(changed):
        first, last = days[0].isoformat(), days[-1].isoformat()
        if first not in existing or last not in existing:
            continue  # not a partition day yet (the consumer rejects days outside the pack's)
        rows = sum(landed[d] for d in days)
        requests.append(dg.RunRequest(
            run_key=f"stream:{first}..{last}:{rows}",
            tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last,
                  "eventml/trigger": "stream", "eventml/rows": str(rows)},
        ))  # fmt: skip
        requested.update({d: landed[d] for d in days})
    observed = _stream_observations(event_source, landed)
    cursor = json.dumps({d.isoformat(): n for d, n in sorted(requested.items())})
    return dg.SensorResult(run_requests=requests, asset_events=observed, cursor=cursor)


def _runs_of_consecutive(days: list[date]) -> list[list[date]]:
    runs: list[list[date]] = []
    for day in days:
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def _stream_observations(event_source: EventSource, landed: dict) -> list[dg.AssetObservation]:
    """The stream as the UI shows it: its backlog and each consumer's latest batch on
    `online_store`, the newest complete day landed on `raw_events`."""
    on_raw = {"stream_complete_through": str(max(landed, default="none"))}
    url = StateHome.from_env().redis_url
    if url is None:
        return [dg.AssetObservation(asset_key="raw_events", metadata=on_raw)]
    stream = EventStream(url, event_source.spec().name)
    on_store = {f"stream_{k}": v for k, v in stream.backlog().items()}
    pending = stream.pending_by_consumer()
    for name, batch in stream.consumer_stats().items():
        on_store |= {
            f"{name}.pending": pending.get(name, 0),
            f"{name}.events_per_s": batch["events_per_s"],
            f"{name}.freshness_p50_ms": batch["freshness_p50_ms"],
            f"{name}.freshness_max_ms": batch["freshness_max_ms"],
            f"{name}.watermark": batch["watermark"],
            f"{name}.last_batch_at": batch["at"],
        }
    return [dg.AssetObservation(asset_key="online_store", metadata=on_store),
            dg.AssetObservation(asset_key="raw_events", metadata=on_raw)]  # fmt: skip


def _judged(context: dg.SensorEvaluationContext, asset: str):
    """The newest materialization of a monitoring asset not seen by an earlier tick, or None."""
    records = context.instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    if not records or (context.cursor and records[0].storage_id <= int(context.cursor)):
        return None
    return records[0]


def _retrain_request(
    context: dg.SensorEvaluationContext, asset: str, trigger: str,
    mlflow_tracking: MlflowTracking, monitoring: Monitoring,
):  # fmt: skip
    """The shared half of the drift and performance sensors: read the monitor's verdict on its
    newest day and request one retrain per champion, once its training data is old enough."""
    event = _judged(context, asset)
    if event is None:
        return dg.SkipReason(f"no new {asset} since the last tick")
    cursor = str(event.storage_id)
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    if not meta.get("judged") or not meta.get("retrain_recommended"):
        why = meta.get("reasons") or "not judged (too few decisions in the window)"
        return dg.SensorResult(skip_reason=f"{asset} {meta.get('as_of', '')}: {why}", cursor=cursor)
    champion = mlflow_tracking.run_of(REGISTERED_MODEL, "champion")
    version = champion[0] if champion else "none"
    if champion and str(meta.get("champion_version")) != version:
        return dg.SensorResult(
            skip_reason=f"{asset} judged v{meta.get('champion_version')}, champion is now v{version}",
            cursor=cursor,
        )
    as_of = date.fromisoformat(meta["as_of"])
    trained_through = _data_through(champion[1]) if champion else None
    if trained_through and (as_of - trained_through).days < monitoring.cooldown_days:
        return dg.SensorResult(
            skip_reason=f"{trigger}: champion v{version} was trained on data through "
            f"{trained_through}, {(as_of - trained_through).days} days before {as_of} "
            f"(cooldown {monitoring.cooldown_days}): nothing new to learn from yet",
            cursor=cursor,
        )
    figures = {
        k: str(v) for k, v in meta.items() if k.startswith(("score_psi.", "auc.", "features_act"))
    }
    context.log.info(f"{trigger}: requesting a retrain of champion v{version}: {meta['reasons']}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                # One retrain per champion and trigger: later ticks over the same drift, or a
                # re-evaluated tick, ask for the run Dagster already has.
                run_key=f"{trigger}:champion-v{version}",
                tags={
                    "eventml/trigger": trigger,
                    "eventml/as_of": meta["as_of"],
                    "eventml/champion_version": version,
                    "eventml/reasons": str(meta["reasons"])[:1000],
                    **{f"eventml/{k}": v for k, v in figures.items()},
                },
            )
        ],
        cursor=cursor,
    )


def _data_through(run) -> date | None:
    """The newest event day a model's training run read (its `raw_events.days` lineage tag)."""
    days = run.data.tags.get("raw_events.days", "")
    return date.fromisoformat(days.split("..")[-1]) if ".." in days else None


@dg.sensor(
    job=retrain_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def drift_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking, monitoring: Monitoring
):
    """Retrain when `feature_drift` says the champion's inputs or scores moved past the
    thresholds of the `monitoring` resource (score PSI, or enough features past 0.25)."""
    return _retrain_request(context, "feature_drift", "drift", mlflow_tracking, monitoring)


@dg.sensor(
    job=retrain_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def performance_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking, monitoring: Monitoring
):
    """Retrain when `live_performance` finds the champion's AUC on matured live decisions more
    than `max_auc_drop` below the AUC it was promoted on."""
    return _retrain_request(context, "live_performance", "performance", mlflow_tracking, monitoring)
