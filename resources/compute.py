"""The `compute` resource: where a step's heavy work runs. In this process (the default), or as
tasks on a Ray cluster: a local one this process starts, or an existing one by address
(`ray://head:10001` through Ray Client, `auto` for the cluster this machine belongs to).

    EVENTML_COMPUTE=ray                        # the steps that shard their work run it on Ray
    EVENTML_RAY_ADDRESS=ray://head:10001       # an existing cluster (unset: a local one)
    EVENTML_RAY_SHARDS=64                      # parts per step (unset: one per CPU)

A step hands `map` one function and one argument tuple per shard; each call runs as a Ray task
of one CPU, retried on another worker if its worker dies (the function must be deterministic:
a retry replaces the lost call's result). The cluster's workers import `eventml` from their own
environment (the same image on Kubernetes; this checkout's for a local cluster).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal

import dagster as dg

# A task is one CPU: libraries that size their thread pools by the machine's cores would
# otherwise start as many threads per task as the machine has, and tasks side by side would
# oversubscribe it (read when each worker process imports them).
ONE_CPU = {"POLARS_MAX_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
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

    @classmethod
    def configured(cls) -> Compute:
        return cls(
            backend=os.environ.get("EVENTML_COMPUTE", "in_process"),
            ray_address=os.environ.get("EVENTML_RAY_ADDRESS") or None,
            shards=int(os.environ.get("EVENTML_RAY_SHARDS", 0)) or None,
        )

    def parts(self) -> int:
        """How many parts a step splits its work into: 1 in process, else `shards`."""
        if self.backend == "in_process":
            return 1
        return self.shards or max(1, int(self._ray().cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """`fn(*args)` for each argument tuple, in order: in this process, or as Ray tasks."""
        if self.backend == "in_process":
            return [fn(*args) for args in calls]
        ray = self._ray()
        task = ray.remote(fn).options(
            num_cpus=1, max_retries=RETRIES, runtime_env={"env_vars": ONE_CPU}
        )
        return ray.get([task.remote(*args) for args in calls])

    def describe(self) -> dict:
        """What a run's metadata says of where it ran."""
        if self.backend == "in_process":
            return {"compute": "in_process"}
        ray = self._ray()
        return {
            "compute": "ray",
            "ray_address": ray.get_runtime_context().gcs_address,
            "ray_nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "ray_cpus": int(ray.cluster_resources().get("CPU", 0)),
        }

    def _ray(self):
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.ray_address, num_cpus=None if self.ray_address else self.num_cpus,
                include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
            )  # fmt: skip
        return ray
