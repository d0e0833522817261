"""Real MLflow (SQLite backend): runs carry lineage; registry versions and aliases move."""

import mlflow

from resources.tracking import MlflowTracking


def test_runs_are_tagged_and_models_registered_without_pickle(tmp_path):
    tracking = MlflowTracking.embedded(tmp_path / "mlflow")
    model_dir = tmp_path / "scorer"
    model_dir.mkdir()
    (model_dir / "default_90d.ubj").write_bytes(b"\x00ubj")
    with tracking.start_run("scorer", {"dagster_run_id": "abc", "raw_events_version": 3}) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    recorded = tracking.client().get_run(run.info.run_id)
    assert (
        recorded.data.tags["dagster_run_id"] == "abc"
        and recorded.data.tags["raw_events_version"] == "3"
    )
    assert recorded.data.tags["git_commit"]

    assert tracking.version_by_alias("risk", "challenger") is None
    v1 = tracking.register("risk", run.info.run_id, "model", alias="challenger")
    v2 = tracking.register("risk", run.info.run_id, "model", alias="challenger")
    assert (v1, v2) == ("1", "2")
    assert str(tracking.version_by_alias("risk", "challenger").version) == "2"
    downloaded = tracking.download("risk", v1, tmp_path / "dl")
    assert (downloaded / "default_90d.ubj").read_bytes() == b"\x00ubj"
