"""The closed loop on private state, driven the way the time machine drives it: what the lending
and card worlds' loop tests share. Days are world days (0 = the world's first)."""

import time
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from eventml.worlds.calendar import date_of
from ml_assets.definitions import build_definitions
from ml_assets.models import REGISTERED_MODEL
from ml_assets.sensors import drift_sensor, performance_sensor
from resources.bento import Serving
from resources.compute import Compute
from resources.delta import DeltaTables
from resources.models import ModelIOManager
from resources.monitoring import Monitoring
from resources.sources import EventSource
from resources.tracking import MlflowTracking

SENSORS = {"drift": drift_sensor, "performance": performance_sensor}


class Loop:
    """One world's tables, models, MLflow and Bentos under `root`, on a Dagster test instance."""

    def __init__(self, root: Path, instance, source: EventSource, monitoring: Monitoring,
                 retrain_config: dict):  # fmt: skip
        self.instance, self.source, self.retrain_config = instance, source, retrain_config
        self.tables = DeltaTables(root_uri=str(root / "tables"))
        self.mlflow = MlflowTracking.embedded(root / "mlflow")
        self.serving = Serving.under(root)
        self.resources = {
            "tables": self.tables, "io_manager": self.tables.io_manager(),
            "model_io_manager": ModelIOManager(root=str(root / "models")),
            "mlflow_tracking": self.mlflow, "event_source": source, "serving": self.serving,
            "monitoring": monitoring, "compute": Compute(),
        }  # fmt: skip
        self.defs = build_definitions(self.resources)
        self.cursors: dict[str, str | None] = dict.fromkeys(SENSORS)
        self.log: list[dict] = []  # one entry per tick
        self.references_ingested = False

    def day(self, n: int) -> str:
        return date_of(self.source.world(), n).isoformat()

    def days(self, first: int, end: int) -> dict:
        """The partition-range tags of days [first, end)."""
        return {
            ASSET_PARTITION_RANGE_START_TAG: self.day(first),
            ASSET_PARTITION_RANGE_END_TAG: self.day(end - 1),
        }

    def ingest(self, first: int, end: int) -> None:
        """Days [first, end) land: events, rejects, the online store and the features (the
        reference tables first, once: the events take them as of their time)."""
        if self.source.spec().references and not self.references_ingested:
            references = dg.materialize(list(self.defs.assets), selection=["references"],
                                        resources=self.resources, instance=self.instance)  # fmt: skip
            assert references.success
            self.references_ingested = True
        result = dg.materialize(
            list(self.defs.assets),
            selection=["raw_events", "event_rejects", "online_store", "decision_features"],
            resources=self.resources, instance=self.instance, tags=self.days(first, end),
        )  # fmt: skip
        assert result.success

    def champion(self) -> str | None:
        found = self.mlflow.version_by_alias(REGISTERED_MODEL, "champion")
        return str(found.version) if found else None

    def retrain(self, run_config: dict | None = None, tags: dict | None = None):
        return self.defs.resolve_job_def("retrain_job").execute_in_process(
            run_config=run_config or self.retrain_config, instance=self.instance,
            tags=tags or {}, raise_on_error=False,
        )  # fmt: skip

    def advance(self, first: int, end: int, url: str) -> dict:
        """Days [first, end) arrive and are served; then both sensors tick."""
        started = time.perf_counter()
        result = self.defs.resolve_job_def("time_machine_job").execute_in_process(
            run_config={"ops": {"prediction_log": {"config": {"url": url}}}},
            instance=self.instance, tags=self.days(first, end),
        )  # fmt: skip
        assert result.success

        def newest(node: str) -> dict:
            meta = result.asset_materializations_for_node(node)[-1].metadata
            return {k: v.value for k, v in meta.items() if not k.startswith(("worst_f", "drift_p"))}

        tick = {"days": (first, end), "seconds": time.perf_counter() - started,
                "drift": newest("feature_drift"), "performance": newest("live_performance"),
                **self.tick()}  # fmt: skip
        self.log.append(tick)
        print(f"tick {first}-{end}: {tick['seconds']:.0f} s, score PSI "
              f"{ {k: v for k, v in tick['drift'].items() if k.startswith('score_psi')} }, "
              f"live AUC { {k: v for k, v in tick['performance'].items() if k.startswith('auc')} }, "
              f"requests {[r.run_key for r in tick['requests']]}")  # fmt: skip
        return tick

    def tick(self) -> dict:
        """Both sensors evaluated once with Dagster's own sensor context; their run requests."""
        requests = []
        for name, sensor in SENSORS.items():
            context = dg.build_sensor_context(
                instance=self.instance, cursor=self.cursors[name], definitions=self.defs,
                resources={"mlflow_tracking": self.mlflow,
                           "monitoring": self.resources["monitoring"]},
            )  # fmt: skip
            result = sensor(context)
            if isinstance(result, dg.SensorResult):
                self.cursors[name] = result.cursor or self.cursors[name]
                requests += result.run_requests or []
        return {"requests": requests}
