"""The `mlflow` resource: experiment tracking and the model registry.

Embedded default: a SQLite backend and local artifacts under EVENTML_HOME; in production the
same calls go to an MLflow server (`tracking_uri=https://…`, Postgres + object store behind it).
Models are registered as plain artifact folders (XGBoost UBJ, torch state_dict + JSON config),
never as pickled pyfunc objects, and every run carries the lineage needed to rebuild it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg


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

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):  # the embedded store's folder, on first use
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        found = mlflow.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        return mlflow.create_experiment(self.experiment, artifact_location=self.artifact_root)

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
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name)
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

    def download_run_artifact(self, run_id: str, path: str, into: Path) -> Path:
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(into),
                tracking_uri=self.tracking_uri,
            )
        )  # fmt: skip
