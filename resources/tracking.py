"""The `mlflow` resource: experiment tracking and the model registry.

Embedded default: a SQLite backend and local artifacts under EVENTML_HOME; in production the
same calls go to an MLflow server (`tracking_uri=https://…`, Postgres + object store behind it).
Models are registered as plain artifact folders (XGBoost UBJ, torch state_dict + JSON config),
never as pickled pyfunc objects, and every run carries the lineage needed to rebuild it.

A new backend store runs its migrations on first open, and two processes opening it at once
race (`table ... already exists`). So the store and the experiment are prepared once per process
under a lock that every process on the store shares (a file lock beside a SQLite store, an
advisory lock in Postgres), and creating the experiment or a registered model takes "already
exists" for an answer.
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import dagster as dg
import polars as pl

from eventml.home import interprocess_lock

# (tracking URI, experiment name) -> experiment id, for the stores this process has prepared.
_PREPARED: dict[tuple[str, str], str] = {}
# Any constant: the Postgres advisory lock every eventml process takes to migrate the store.
_PG_LOCK_KEY = 0x6576_6D6C


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    artifact_root: str
    experiment: str = "eventml"
    ui_url: str = "http://127.0.0.1:5000"

    @classmethod
    def embedded(cls, folder: Path) -> MlflowTracking:
        return cls(
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            artifact_root=(folder / "artifacts").as_uri(),
        )

    @classmethod
    def on_postgres(cls, database_url: str, artifact_folder: Path) -> MlflowTracking:
        """Tracking and registry in a Postgres database; artifacts stay in a folder (an object
        store URI in production)."""
        return cls(tracking_uri=database_url, artifact_root=artifact_folder.as_uri())

    def client(self):
        from mlflow import MlflowClient

        self.experiment_id()  # the store exists before any client call reaches it
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        """The experiment's id; on this process's first call, the store is created or migrated
        and the experiment created, under the store's lock."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        key = (self.tracking_uri, self.experiment)
        if key not in _PREPARED:
            with self._store_lock():
                _PREPARED[key] = self._prepare()
        return _PREPARED[key]

    def _store_lock(self):
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return interprocess_lock(db.with_name(db.name + ".lock"))
        if self.tracking_uri.startswith("postgresql"):
            return _pg_advisory_lock(self.tracking_uri)
        return nullcontext()  # an MLflow server migrates its own store

    def _prepare(self) -> str:
        from mlflow import MlflowClient

        # Its "Creating initial MLflow database tables..." is news to nobody: it runs once, here.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        client.search_experiments(max_results=1)  # opens (creates, migrates) the tracking store
        client.search_registered_models(max_results=1)  # and the registry's
        found = client.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception as error:  # created meanwhile by a process that holds no lock (a server)
            if not _already_exists(error):
                raise
            return client.get_experiment_by_name(self.experiment).experiment_id

    @contextmanager
    def start_run(self, run_name: str, lineage: dict[str, str | int | None]) -> Iterator:
        """An MLflow run tagged with the git commit and the given lineage (Dagster run id, Delta
        table versions, partition range), so any model can be traced back and rebuilt."""
        import mlflow

        experiment_id = self.experiment_id()
        tags = {"git_commit": git_commit(), **{k: str(v) for k, v in lineage.items()}}
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            yield run

    def run_link(self, run_id: str) -> str:
        return f"{self.ui_url}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def register(self, name: str, run_id: str, artifact_path: str, alias: str | None = None) -> str:
        """A new version of `name` from a run's artifact folder; optionally point `alias` at it."""
        client = self.client()
        try:
            client.create_registered_model(name)
        except Exception as error:
            if not _already_exists(error):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = client.create_model_version(name, source=source, run_id=run_id)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def version_by_alias(self, name: str, alias: str):
        """The model version an alias points at, or None if the alias is not set yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def download(self, name: str, version: str, into: Path) -> Path:
        import mlflow

        source = self.client().get_model_version(name, version).source
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into)))

    def run_of(self, name: str, alias: str):
        """(version, MLflow run) of the model version an alias points at, or None."""
        version = self.version_by_alias(name, alias)
        if version is None:
            return None
        return str(version.version), self.client().get_run(version.run_id)

    def log_evaluation(self, run_id: str, report, reference) -> None:
        """An out-of-time `eventml.report.Report` onto the challenger's run: its test metrics
        (`test.<task>.<metric>`), the plots, and the monitoring reference sample."""
        import tempfile

        from PIL import Image

        from eventml.report import METRICS, REFERENCE_ARTIFACT

        client = self.client()
        for row in report.table.filter(pl.col("model") == "challenger").iter_rows(named=True):
            for metric in METRICS:
                client.log_metric(run_id, f"test.{row['task']}.{metric}", row[metric])
        for name, png in report.plots.items():
            image = Image.open(io.BytesIO(png))
            client.log_image(run_id, image, artifact_file=f"evaluation/{name}.png")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
            reference.write_parquet(path)
            client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))

    def download_run_artifact(self, run_id: str, path: str, into: Path) -> Path:
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(into),
                tracking_uri=self.tracking_uri,
            )
        )  # fmt: skip


def _already_exists(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


@contextmanager
def _pg_advisory_lock(database_url: str) -> Iterator[None]:
    """A session-level Postgres advisory lock: held until released or the connection dies."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_PG_LOCK_KEY})"))
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({_PG_LOCK_KEY})"))
    finally:
        engine.dispose()
