"""The code location: every asset, check, sensor and job, with resources for this environment."""

import os

import dagster as dg

from eventml.home import StateHome
from ml_assets import evaluation, features, ingest, models, monitoring, serving
from ml_assets.jobs import (
    ingest_job,
    references_job,
    retrain_job,
    time_machine_job,
    weekly_retrain,
)
from ml_assets.sensors import (
    drift_sensor,
    landing_zone_sensor,
    performance_sensor,
    reference_files_sensor,
    stream_sensor,
)
from resources.bento import Serving
from resources.compute import Compute
from resources.delta import DeltaTables
from resources.models import ModelIOManager
from resources.monitoring import Monitoring
from resources.sources import EventSource
from resources.state import mlflow_tracking


def build_resources(home: StateHome | None = None) -> dict:
    """Embedded defaults under EVENTML_HOME, each moved by one setting: EVENTML_TABLES_URI the
    tables (e.g. s3://bucket/eventml), EVENTML_REDIS_URL the online store to Redis (both read by
    `eventml.home.StateHome`), EVENTML_POSTGRES_URL MLflow (and, through the dagster.yaml that
    `resources.state` writes, Dagster's instance) to Postgres; EVENTML_SOURCE=landing ingests the
    landing zone, EVENTML_SOURCE=stream the days the stream consumer landed."""
    home = home or StateHome.from_env()
    tables = DeltaTables(root_uri=home.tables_uri)
    return {
        "tables": tables,
        "io_manager": tables.io_manager(),
        "model_io_manager": ModelIOManager(root=str(home.root / "models")),
        "mlflow_tracking": mlflow_tracking(home),
        "event_source": EventSource(kind=os.environ.get("EVENTML_SOURCE", "simulator")),
        "serving": Serving.configured(home),
        "monitoring": Monitoring(),
        "compute": Compute.configured(),
    }


MODULES = [ingest, features, models, evaluation, serving, monitoring]


@dg.configured(
    dg.multi_or_in_process_executor,
    config_schema={"in_process": dg.Field(bool, default_value=False,
                                          description="every step in the run's own process")},
)  # fmt: skip
def STEP_PROCESSES(config: dict) -> dict:
    """Each step in its own process, forked from a server that imported this code location
    once: a fresh interpreter per step spent 6-9 s importing torch, mlflow and dagster on 2
    cores, more than most steps compute. A run that needs no isolation between its steps (a
    short one, a test's) may ask for `in_process` instead and spare the server's start."""
    if config["in_process"]:
        return {"in_process": {}}
    return {"multiprocess": {"start_method": {"forkserver": {
        "preload_modules": ["ml_assets.definitions"]}}}}  # fmt: skip


def build_definitions(resources: dict) -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules(MODULES),
        asset_checks=dg.load_asset_checks_from_modules(MODULES),
        jobs=[ingest_job, references_job, retrain_job, time_machine_job],
        schedules=[weekly_retrain],
        sensors=[
            landing_zone_sensor,
            reference_files_sensor,
            stream_sensor,
            drift_sensor,
            performance_sensor,
        ],
        resources=resources,
        executor=STEP_PROCESSES,
    )


defs = build_definitions(build_resources())
