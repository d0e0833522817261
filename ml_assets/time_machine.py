"""`make advance DAYS=n`: move the simulated world forward and let the system react.

    python -m ml_assets.time_machine --days 30 [--step 5] [--no-act] [--seconds-per-day 2]

Each step of `--step` days is one `time_machine_job` run (ingest, online store, features, the
days' applications scored by the champion Bento over HTTP, the prediction log ingested, drift
and live performance judged). When the deployment's source is the stream (EVENTML_SOURCE=stream),
the step's days are first published to it as they happen (`--seconds-per-day`), and the run
starts once the consumer (`make stream`) has landed them all: the run ingests what it landed. Then the drift and performance sensors are evaluated with the
same code and run keys the Dagster daemon uses, and a retrain they request runs at once
(`--no-act` leaves that to the daemon of `make ui`). Runs land in DAGSTER_HOME, so the UI shows
every step, its metadata, the sensor ticks' requests and the retrain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from datetime import date, timedelta

import dagster as dg
import polars as pl
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)

from eventml.home import StateHome
from eventml.stream import EventStream
from eventml.stream.landed import EVENTS, watermark
from eventml.stream.producer import publish_days, wait_until_taken
from eventml.worlds import world
from ml_assets.definitions import build_definitions, build_resources
from ml_assets.models import REGISTERED_MODEL
from ml_assets.partitions import daily
from ml_assets.sensors import drift_sensor, performance_sensor
from resources.state import dagster_home, prepare


def next_day(tables) -> date:
    events = tables.scan("raw_events")
    if events is None:
        sys.exit("no raw_events yet: run `make demo` first (it ingests the days before the shift)")
    return events.select(pl.col("day").max()).collect().item() + timedelta(days=1)


class TimeMachine:
    def __init__(self, home: StateHome):
        self.resources = build_resources(home)
        self.defs = build_definitions(self.resources)
        self.instance = dg.DagsterInstance.get()
        self.cursor_file = home.root / "time_machine.json"
        self.cursors = json.loads(self.cursor_file.read_text()) if self.cursor_file.exists() else {}

    def champion(self) -> str | None:
        found = self.resources["mlflow_tracking"].version_by_alias(REGISTERED_MODEL, "champion")
        return str(found.version) if found else None

    def step(self, first: date, last: date, url: str) -> dict:
        result = self.defs.resolve_job_def("time_machine_job").execute_in_process(
            run_config={"ops": {"prediction_log": {"config": {"url": url}}}},
            instance=self.instance,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: first.isoformat(),
                ASSET_PARTITION_RANGE_END_TAG: last.isoformat(),
                "eventml/trigger": "time_machine",
            },
            raise_on_error=False,
        )
        if not result.success:
            sys.exit(
                f"time_machine_job failed for {first}..{last}: see `make ui`, run {result.run_id}"
            )
        meta = result.asset_materializations_for_node("feature_drift")[-1].metadata
        return {k: v.value for k, v in meta.items()}

    def publish(self, first: date, last: date, seconds_per_day: float) -> None:
        """The days [first, last] of the world to its stream, then wait until they are landed.
        Events the stream landed already (a step run again) are not sent again: copies would be
        rejects."""
        source, home = self.resources["event_source"], StateHome.from_env()
        module, config = world(source.pack), source.world()
        days = range(module.day_of(config, first), module.day_of(config, last) + 1)
        stream = EventStream(home.require_redis(), source.spec().name)
        log = lambda line: print(f"  {line}", flush=True)  # noqa: E731
        wait_until_taken(stream, log=log)
        landed = watermark(self.resources["tables"].uri(EVENTS))
        unsent = (
            (day, events if landed is None else events.filter(pl.col("ts") > landed))
            for day, events in module.iter_days(config, days)
        )
        publish_days(stream, unsent, seconds_per_day, log)
        wait_until_taken(stream, log=log)

    def act(self) -> list[dict]:
        """Evaluate both sensors once; run what they request, tagged as the daemon would."""
        outcomes = []
        for sensor in (drift_sensor, performance_sensor):
            context = dg.build_sensor_context(
                instance=self.instance, cursor=self.cursors.get(sensor.name),
                definitions=self.defs, resources=self.resources,
            )  # fmt: skip
            result = sensor(context)
            if not isinstance(result, dg.SensorResult):
                print(f"  {sensor.name}: {result.skip_message}", flush=True)
                continue
            if result.skip_reason:
                print(f"  {sensor.name}: {result.skip_reason.skip_message[:300]}", flush=True)
            if result.cursor:
                self.cursors[sensor.name] = result.cursor
            for request in result.run_requests or []:
                key = {RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: sensor.name}
                if self.instance.get_runs(filters=dg.RunsFilter(tags=key), limit=1):
                    # The daemon's rule: a run key launches once (a refused or failed retrain
                    # of this champion is not retried on the same drift).
                    print(f"  {sensor.name}: {request.run_key} already ran", flush=True)
                    continue
                print(f"  {sensor.name}: {request.tags.get('eventml/reasons')}", flush=True)
                print(f"  running retrain_job ({request.run_key}) ...", flush=True)
                started = time.perf_counter()
                run = self.defs.resolve_job_def("retrain_job").execute_in_process(
                    instance=self.instance, raise_on_error=False,
                    tags={**request.tags, **key},
                )  # fmt: skip
                outcomes.append({"run_key": request.run_key, "success": run.success,
                                 "seconds": time.perf_counter() - started})  # fmt: skip
        self.cursor_file.write_text(json.dumps(self.cursors))
        return outcomes


def main() -> int:
    ap = argparse.ArgumentParser(description="Advance the simulated world day by day.")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--step", type=int, default=5, help="days per time_machine_job run")
    ap.add_argument("--no-act", action="store_true", help="leave the sensors to the daemon")
    ap.add_argument(
        "--seconds-per-day",
        type=float,
        default=2.0,
        help="the stream's clock (EVENTML_SOURCE=stream): seconds per simulated day",
    )
    args = ap.parse_args()
    home = StateHome.from_env()
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home(home)))
    prepare(home)  # every store created once, before this run's steps open them
    machine = TimeMachine(home)
    serving = machine.resources["serving"]
    first, end = next_day(machine.resources["tables"]), daily.end.date()
    last_day = min(first + timedelta(days=args.days), end)
    if first >= end:
        sys.exit(f"the world ends on {end - timedelta(days=1)}: nothing left to advance")
    with ExitStack() as bento:
        served, url = None, None
        while first < last_day:
            last = min(first + timedelta(days=args.step), last_day) - timedelta(days=1)
            champion = machine.champion()
            if champion != served:  # (re)start the champion's Bento when the champion changes
                bento.close()
                built = serving.bento_for(champion) if champion else None
                if built is None:
                    sys.exit(f"no Bento for champion v{champion}: run `make demo` first")
                url = bento.enter_context(serving.serve(built["tag"]))
                served = champion
                print(f"serving {built['tag']} (champion v{champion}) at {url}", flush=True)
            started = time.perf_counter()
            if machine.resources["event_source"].kind == "stream":
                machine.publish(first, last, args.seconds_per_day)
            drift = machine.step(first, last, url)
            psi = " ".join(f"{k.removeprefix('score_psi.')}={v:.3f}" for k, v in drift.items()
                           if k.startswith("score_psi."))  # fmt: skip
            print(f"{first}..{last}: {time.perf_counter() - started:.0f} s; champion v{champion}; "
                  f"score PSI {psi or 'n/a'}; features past act {drift.get('features_act', 'n/a')}; "
                  f"retrain recommended: {drift.get('retrain_recommended', False)}", flush=True)  # fmt: skip
            if not args.no_act:
                for outcome in machine.act():
                    now = machine.champion()
                    print(f"  retrain {'succeeded' if outcome['success'] else 'FAILED'} in "
                          f"{outcome['seconds']:.0f} s; champion v{champion} -> v{now}", flush=True)  # fmt: skip
            first = last + timedelta(days=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
