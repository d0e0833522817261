"""Training on a Ray cluster's workers with Ray Train: the encoder data-parallel (`TorchTrainer`,
DDP over gloo on CPUs, NCCL on GPUs), the scorers' boosters with XGBoost's collective
(`XGBoostTrainer`). Both give what the in-process trainers give: an encoder trained in place
(saved as state_dict + JSON), boosters saved as UBJ.

The encoder's workers each train on their own entities' sequences, which tasks build by parts
of whole entities, each from only its entities' events, into the object store: no process, the
driver included, holds every sequence. Each replica validates on its parts' validation rows and
the group's figures are computed over all of them, so the replicas agree on the best epoch.
The boosters' driver splits the training rows into one part per worker (every `workers`-th row,
so each part spans the whole period), put in the object store once; XGBoost's workers split the
validation rows too, and its collective computes each round's metric over all of them.
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

from eventml.cluster.workers import ONE_CPU, files_of, write_files
from eventml.encoder import Encoder, TrainConfig, TrainResult, save, train
from eventml.encoder.batches import batches_in
from eventml.encoder_data import EncoderData
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
    # Parts of whole entities the encoder's sequences are built in, by as many tasks (at least
    # one per worker): more parts bound each task's memory by a smaller part.
    parts: int = 0
    # Attempts of a building task whose worker died before the step fails.
    retries: int = 3

    def train_encoder(
        self, encoder: Encoder, data: EncoderData, config: TrainConfig, log=None
    ) -> TrainResult:
        """`eventml.encoder.train` on the workers, DDP, each worker on its own entities'
        sequences: tasks build them by parts of whole entities (`EncoderData.by_entity`, each
        reading only its entities' events) into the object store, where the workers train on
        them; no process holds every sequence. A step still learns from `batch_size` rows
        (`batch_size / workers` on each worker), and every worker takes the steps an epoch that
        the worker with the fewest rows can; the validation figures are the group's, over
        every validation row. The encoder ends with the trained weights of its best epoch."""
        import ray
        from ray.train.torch import TorchTrainer

        per_worker = replace(config, batch_size=max(1, config.batch_size // self.workers))
        parts = data.by_entity(max(self.parts, self.workers))
        if len(parts) < self.workers:
            raise ValueError(
                f"{len(parts)} entities' worth of rows for {self.workers} training workers: "
                "train in process, or on fewer workers"
            )
        build = ray.remote(_build_sequences).options(
            num_cpus=1, num_returns=3, max_retries=self.retries, runtime_env={"env_vars": ONE_CPU}
        )
        built = [build.remote(part) for part in parts]  # (train, valid) arrays and rows of each
        # Every part built before the workers take the cluster's CPUs (a failed build raises
        # here, by its own error); the arrays stay in the object store.
        ray.get([rows for *_, rows in built])
        dealt = _deal([part.learn.height for part in parts], self.workers)
        steps = min(
            sum(batches_in(parts[i].learn.height, per_worker.batch_size) for i in mine)
            for mine in dealt
        )
        if steps < 1:
            raise ValueError(
                f"a training worker has no batch of {per_worker.batch_size} rows: "
                f"{data.learn.height:,} rows to learn from are too few for {self.workers} "
                "workers; train in process, or on fewer workers"
            )
        with tempfile.TemporaryDirectory() as tmp:
            initial = files_of(save(encoder, tmp))
        job = {
            "initial": initial,
            "train": [[built[i][0] for i in mine] for mine in dealt],
            "valid": [[built[i][1] for i in mine] for mine in dealt],
            "steps": steps,
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
            columns = [_row_parts(array, self.workers) for array in task_rows]
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


def _row_parts(array: np.ndarray, parts: int) -> list[np.ndarray]:
    """Every `parts`-th row from row i, for each i: each part spans the whole period."""
    return [np.ascontiguousarray(array[i::parts]) for i in range(parts)]


def _deal(rows: list[int], workers: int) -> list[list[int]]:
    """Parts (by their rows) dealt to workers, largest first to the one with the fewest rows so
    far (of two, the one with fewer parts), so the workers' rows come out nearly even and each
    worker gets a part: each worker's list of part indices."""
    dealt, held = [[] for _ in range(workers)], [0] * workers
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]):
        worker = min(range(workers), key=lambda w: (held[w], len(dealt[w])))
        dealt[worker].append(i)
        held[worker] += rows[i]
    return [sorted(mine) for mine in dealt]


def _build_sequences(part: EncoderData) -> tuple[dict, dict, int]:
    """A Ray task: one part's training and validation arrays, from its entities' events, and
    its learning rows."""
    train, valid = part.arrays()
    return train, valid, len(train["mask"])


def _encoder_worker(job: dict) -> None:
    """One DDP replica: its parts' training and validation rows, read where the object store
    holds them; rank 0 reports the trained encoder (state_dict + JSON) and the training's
    history as the checkpoint."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(job["threads"])
    # The object store's arrays are read-only shared memory; training never writes its inputs.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    with tempfile.TemporaryDirectory() as tmp:
        encoder = Encoder.load(write_files(job["initial"], tmp))
    # Each replica its own shuffles and dropout (the weights start alike: DDP broadcasts rank 0's).
    config = replace(TrainConfig(**job["config"]), seed=job["config"]["seed"] + 7919 * rank)
    if job["gpu"]:
        import ray.train.torch

        config = replace(config, device=str(ray.train.torch.get_device()))
    train_parts = ray.get(job["train"][rank])
    valid_parts = ray.get(job["valid"][rank])
    result = train(encoder, train_parts, valid_parts, config, steps_per_epoch=job["steps"])
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
