"""The `compute` resource: where a step's heavy work runs. In this process (the default), or as
tasks on a Ray cluster: a local one this process starts, or an existing one by address
(`ray://head:10001` through Ray Client, `auto` for the cluster this machine belongs to).

    EVENTML_COMPUTE=ray                        # the steps that shard their work run it on Ray
    EVENTML_RAY_ADDRESS=ray://head:10001       # an existing cluster (unset: a local one)
    EVENTML_RAY_SHARDS=64                      # parts per step (unset: one per CPU)
    EVENTML_RAY_STORAGE=s3://bucket/ray        # Ray Train's checkpoints (unset: EVENTML_HOME/ray)

What runs where:
- `map`: a step's function over its shards (the features), each call a Ray task of one CPU,
  retried on another worker if its worker dies (the function must be deterministic: a retry
  replaces the lost call's result);
- `encoder_trainer`, `booster_trainer`: the training loops, in process or on Ray Train's
  workers (one per CPU), the same artifacts either way; on Ray the encoder's sequences are built
  by entity shard, one task per part (retried like `map`'s), where its workers read them;
- `embeddings`, `scores`: the encoder's outputs and the scorer's probabilities for every
  decision, in process or by Ray Data.

The cluster's workers import `eventml` from their own environment (the same image on Kubernetes;
this checkout's for a local cluster).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal

import dagster as dg
import polars as pl

from eventml.cluster.workers import ONE_CPU
from eventml.embedding import SequenceModel, Trainer, embedding_table, train_in_process
from eventml.home import StateHome
from eventml.scorer import BoosterTrainer, Scorer, train_boosters

# The Dagster concurrency pool of the steps that keep every core they are given busy (features,
# encoder, embeddings, scorers): its limit, across all runs, is `eventml.threads.steps_at_once`,
# and each such step sizes its threads to its share of the cores (`eventml.threads`).
CPU_POOL = "cpu"

# Attempts of a task whose worker died (a node lost, a process killed) before it fails the step.
RETRIES = 3


class Compute(dg.ConfigurableResource):
    """Where a step's heavy work runs: in the step's process, or as tasks on a Ray cluster."""

    backend: Literal["in_process", "ray"] = "in_process"
    # Ray: the cluster's address (None: start a local cluster in this process, or use the one
    # this process already started), and the CPUs a local cluster gets (None: every core).
    ray_address: str | None = None
    num_cpus: int | None = None
    # Parts a step splits its work into on Ray (None: one per CPU of the cluster). More parts
    # than CPUs bound each task's memory by a smaller part; they run a CPU's worth at a time.
    shards: int | None = None
    # Where Ray Train keeps its runs' checkpoints: a folder every node reaches (None: the state
    # folder's `ray/`, right for a cluster on this machine; s3://… for a real one).
    storage_path: str | None = None

    @classmethod
    def configured(cls) -> Compute:
        backend = os.environ.get("EVENTML_COMPUTE", "in_process")
        if backend not in ("in_process", "ray"):
            raise ValueError(
                f"EVENTML_COMPUTE={backend!r}: set it to 'ray' (a Ray cluster) or 'in_process' "
                "(the default), or unset it"
            )
        return cls(
            backend=backend,
            ray_address=os.environ.get("EVENTML_RAY_ADDRESS") or None,
            shards=int(os.environ.get("EVENTML_RAY_SHARDS", 0)) or None,
            storage_path=os.environ.get("EVENTML_RAY_STORAGE") or None,
        )

    def parts(self) -> int:
        """How many parts a step splits its work into: 1 in process, else `shards`."""
        if self.backend == "in_process":
            return 1
        return self.shards or self._cpus()

    def workers_share_this_disk(self) -> bool:
        """Whether every worker reads and writes this machine's disk: in process, or on a local
        cluster this process starts. A cluster by address may span machines."""
        return self.backend == "in_process" or self.ray_address is None

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """`fn(*args)` for each argument tuple, in order: in this process, or as Ray tasks."""
        if self.backend == "in_process":
            return [fn(*args) for args in calls]
        ray = self._ray()
        task = ray.remote(fn).options(
            num_cpus=1, max_retries=RETRIES, runtime_env={"env_vars": ONE_CPU}
        )
        return ray.get([task.remote(*args) for args in calls])

    def encoder_trainer(self) -> Trainer:
        """The encoder's sequences and training loop: in this process, or built by entity
        shard by Ray tasks and trained on DDP by Ray Train's workers."""
        if self.backend == "in_process":
            return train_in_process
        return self._ray_train().train_encoder

    def booster_trainer(self) -> BoosterTrainer:
        """The scorers' boosting: in this process, or XGBoost's collective on Ray Train."""
        return train_boosters if self.backend == "in_process" else self._ray_train().train_boosters

    def embeddings(
        self, model: SequenceModel, events_uri: str, version: int | None, decisions: pl.DataFrame
    ) -> pl.DataFrame:
        """The encoder's outputs for every decision from the events table (a Delta table with a
        `day` column) at `version`: in this process, or by parts with Ray Data."""
        if self.backend == "in_process":
            events = pl.scan_delta(events_uri, version=version)
            events = events.select(model.sequence_spec.event_columns).collect()
            return embedding_table(model, events, decisions)
        from eventml.cluster import embedding_table_by_parts

        return embedding_table_by_parts(
            model, events_uri, version, decisions, self.parts(), workers=self._cpus()
        )

    def scores(self, scorer: Scorer, table: pl.DataFrame) -> pl.DataFrame:
        """decision_id and the scorer's probability per task (`p_<task>`) for every row of
        `table` (decision_id and the scorer's inputs), in its order: in this process, or by
        blocks with Ray Data."""
        if self.backend == "in_process":
            return scorer.probability_table(table)
        from eventml.cluster import probability_table_by_parts

        return probability_table_by_parts(scorer, table, self.parts(), workers=self._cpus())

    def describe(self) -> dict:
        """What a run's metadata says of where it ran."""
        if self.backend == "in_process":
            return {"compute": "in_process"}
        ray = self._ray()
        return {
            "compute": "ray",
            "ray_address": ray.get_runtime_context().gcs_address,
            "ray_nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "ray_cpus": self._cpus(),
        }

    def _cpus(self) -> int:
        return max(1, int(self._ray().cluster_resources().get("CPU", 1)))

    def _ray_train(self):
        from eventml.cluster import RayTrain

        storage = self.storage_path or str(StateHome.from_env().ray)
        return RayTrain(
            workers=self._cpus(), storage_path=storage, parts=self.parts(), retries=RETRIES
        )

    def _ray(self):
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.ray_address, num_cpus=None if self.ray_address else self.num_cpus,
                include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
            )  # fmt: skip
        return ray
