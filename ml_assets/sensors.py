"""Sensors: new files in the landing zone become ingest runs for the days they hold."""

import json

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from eventml.sources import file_days, landing_files
from ml_assets.jobs import ingest_job
from ml_assets.partitions import daily
from resources.sources import EventSource


@dg.sensor(
    job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def landing_zone_sensor(context: dg.SensorEvaluationContext, event_source: EventSource):
    """One run per new (or rewritten) file, over the days the file has rows for.

    A file is known by name, size and modification time: that is the run_key, so Dagster never
    launches it twice, and the cursor remembers it so later ticks do not even reread it.
    """
    if event_source.kind != "landing":
        return dg.SkipReason(
            "event_source is the simulator; set EVENTML_SOURCE=landing to watch files"
        )
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    spec = event_source.spec()
    keys = set(daily.get_partition_keys())
    requests = []
    for path in landing_files(event_source.landing_path):
        stat = path.stat()
        file_key = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
        if file_key in seen:
            continue
        seen.add(file_key)
        days = [d.isoformat() for d in file_days(path, spec) if d.isoformat() in keys]
        if not days:
            context.log.warning(
                f"{path.name}: no rows inside the partitions {daily.start:%Y-%m-%d}..; skipped"
            )
            continue
        requests.append(
            dg.RunRequest(
                run_key=file_key,
                tags={
                    ASSET_PARTITION_RANGE_START_TAG: days[0],
                    ASSET_PARTITION_RANGE_END_TAG: days[-1],
                    "eventml/trigger": "landing_file",
                    "eventml/file": path.name,
                },
            )
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(sorted(seen)))
