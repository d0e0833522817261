"""Training on a Ray cluster's workers with Ray Train: the encoder data-parallel (`TorchTrainer`,
DDP over gloo on CPUs, NCCL on GPUs), the scorers' boosters with XGBoost's collective
(`XGBoostTrainer`). Both give what the in-process trainers give: an encoder trained in place
(saved as state_dict + JSON), boosters saved as UBJ.

Each worker gets its own rows: the driver splits them into one part per worker (every
`workers`-th row, so each part spans the whole period) and puts each part in the object store
once; a worker reads only its own part. The encoder's replicas each validate on all the
validation rows, so they agree on the best epoch; XGBoost's workers split them too, and its
collective computes each round's validation metric over all of them.
"""

from __future__ import annotations

import json
import tempfile
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xgboost as xgb

from eventml.cluster.workers import files_of, write_files
from eventml.encoder import Encoder, TrainConfig, TrainResult, save, train
from eventml.scorer import ScorerConfig, TaskRows


@dataclass(frozen=True)
class RayTrain:
    """How a training step runs on the cluster: its workers, the CPUs each takes (its thread
    budget), and where Ray Train keeps its runs' checkpoints (a folder every node can reach:
    local for one machine, s3://… for a cluster)."""

    workers: int
    storage_path: str
    cpus_per_worker: int = 1
    use_gpu: bool = False

    def train_encoder(
        self,
        encoder: Encoder,
        train_data: dict[str, np.ndarray],
        valid_data: dict[str, np.ndarray] | None,
        config: TrainConfig,
        log=None,
    ) -> TrainResult:
        """`eventml.encoder.train` on the workers, DDP: the same steps as in one process (each
        worker's batch is `batch_size / workers` rows, so a step still learns from
        `batch_size`); the encoder ends with the trained weights of its best epoch."""
        import ray
        from ray.train.torch import TorchTrainer

        per_worker = replace(config, batch_size=max(1, config.batch_size // self.workers))
        with tempfile.TemporaryDirectory() as tmp:
            initial = files_of(save(encoder, tmp))
        job = {
            "initial": initial,
            "parts": [ray.put(part) for part in _row_parts(train_data, self.workers)],
            "valid": ray.put(valid_data) if valid_data is not None else None,
            "config": asdict(per_worker),
            "threads": self.cpus_per_worker,
            "gpu": self.use_gpu,
        }
        result = TorchTrainer(
            _encoder_worker, train_loop_config=job, **self._run("sequence-encoder")
        ).fit()
        with result.checkpoint.as_directory() as directory:
            trained = Encoder.load(Path(directory) / "encoder")
            outcome = json.loads((Path(directory) / "result.json").read_text())
        encoder.load_state_dict(trained.state_dict())
        trained_result = TrainResult(**outcome)
        for row in trained_result.history:
            (log or print)(f"epoch {row['epoch']} on {self.workers} workers: " + ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_loss", "valid_"))
            ))  # fmt: skip
        return trained_result

    def train_boosters(
        self,
        params: dict,
        rows: dict[str, TaskRows],
        feature_names: list[str],
        config: ScorerConfig,
    ) -> dict[str, xgb.Booster]:
        """`eventml.scorer.train_boosters` on the workers: each builds its rows' histograms and
        XGBoost's collective sums them, so every round's trees are grown from all the rows."""
        import ray
        from ray.train.xgboost import XGBoostTrainer

        parts = [{} for _ in range(self.workers)]
        for task, task_rows in rows.items():
            columns = [_row_parts(array, self.workers, equal=False) for array in task_rows]
            for worker, part in enumerate(zip(*columns, strict=True)):
                parts[worker][task] = part
        job = {
            "parts": [ray.put(part) for part in parts],
            "params": {**params, "nthread": self.cpus_per_worker},
            "feature_names": feature_names,
            "rounds": config.n_estimators,
            "early_stopping_rounds": config.early_stopping_rounds,
        }
        result = XGBoostTrainer(_booster_worker, train_loop_config=job, **self._run("scorer")).fit()
        boosters = {}
        with result.checkpoint.as_directory() as directory:
            for task in rows:
                boosters[task] = xgb.Booster(model_file=str(Path(directory) / f"{task}.ubj"))
        return boosters

    def _run(self, name: str) -> dict:
        from ray.train import RunConfig, ScalingConfig

        return {
            "scaling_config": ScalingConfig(
                num_workers=self.workers,
                use_gpu=self.use_gpu,
                resources_per_worker={"CPU": self.cpus_per_worker},
            ),
            "run_config": RunConfig(
                name=f"{name}-{uuid.uuid4().hex[:8]}", storage_path=self.storage_path
            ),
        }


def _row_parts(data, parts: int, equal: bool = True) -> list:
    """Every `parts`-th row from row i, for each i: arrays or dicts of arrays with rows first.
    `equal` cuts them to the same length (at most `parts - 1` rows left out), which DDP needs:
    every replica must take as many steps as the others."""
    rows = len(data["mask"]) if isinstance(data, dict) else len(data)
    keep = rows // parts * parts if equal else rows

    def part(array: np.ndarray, i: int) -> np.ndarray:
        return np.ascontiguousarray(array[i:keep:parts])

    if isinstance(data, dict):
        return [{k: part(v, i) for k, v in data.items()} for i in range(parts)]
    return [part(data, i) for i in range(parts)]


def _encoder_worker(job: dict) -> None:
    """One DDP replica: its part of the rows, all the validation rows; rank 0 reports the
    trained encoder (state_dict + JSON) and the training's history as the checkpoint."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(job["threads"])
    # The object store's arrays are read-only shared memory; training never writes its inputs.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    with tempfile.TemporaryDirectory() as tmp:
        encoder = Encoder.load(write_files(job["initial"], tmp))
    valid = ray.get(job["valid"]) if job["valid"] is not None else None
    config = TrainConfig(**job["config"])
    if job["gpu"]:
        import ray.train.torch

        config = replace(config, device=str(ray.train.torch.get_device()))
    result = train(encoder, ray.get(job["parts"][rank]), valid, config)
    metrics = {"best_epoch": result.best_epoch, "best_metric": result.best_metric}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(encoder, Path(tmp) / "encoder")
        (Path(tmp) / "result.json").write_text(json.dumps(asdict(result)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _booster_worker(job: dict) -> None:
    """One XGBoost worker inside the collective Ray Train opened: a booster per task from its
    part of the rows; rank 0 reports the boosters as UBJ."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    names = job["feature_names"]
    boosters = {}
    for task, (train_x, train_y, valid_x, valid_y) in ray.get(job["parts"][rank]).items():
        boosters[task] = xgb.train(
            job["params"],
            xgb.DMatrix(train_x, label=train_y, feature_names=names),
            num_boost_round=job["rounds"],
            evals=[(xgb.DMatrix(valid_x, label=valid_y, feature_names=names), "valid")],
            early_stopping_rounds=job["early_stopping_rounds"],
            verbose_eval=False,
        )
    if rank != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as tmp:
        for task, booster in boosters.items():
            booster.save_model(Path(tmp) / f"{task}.ubj")
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
