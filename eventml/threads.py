"""How many threads a CPU-heavy step may use: a fixed budget per process, set before the
libraries start their pools, so that steps side by side share the cores instead of each taking
all of them.

    EVENTML_STEPS_AT_ONCE=1   # CPU-heavy steps that run at once on this machine (default 1)
    EVENTML_THREADS=4         # the threads each one gets (default: cores given / steps at once)

The cores given are this process's: its CPU affinity (`taskset`, a pinned container) and the
CPU quota of a container's own cgroup (v2 `cpu.max` at the cgroup root it sees), whichever is
smaller. The steps at once is also the limit of the Dagster pool the heavy steps join
(`resources.compute.CPU_POOL`), which the set-up step writes to an eventml-written dagster.yaml:
by default a second heavy step (another run's retrain) waits for the first instead of running
beside it at a fraction of its speed; with EVENTML_STEPS_AT_ONCE=2 two run side by side on half
the cores each. (A dagster.yaml of your own keeps its own limit; Dagster applies it to all pools.)

The budget is a setting, not what happens to be idle: the encoder's sums depend on how many
threads split them, so fixed threads give the same weights whether or not a neighbour runs; a
machine with other cores gives another budget, and so other bits. A library's own variable
(OMP_NUM_THREADS for torch, MKL/OPENBLAS_NUM_THREADS, POLARS_MAX_THREADS), set before the
process starts, wins for that library; XGBoost and the feature kernels follow EVENTML_THREADS.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# What each library reads for its pool size, once, when it starts the pool.
POOL_VARIABLES = (
    "OMP_NUM_THREADS",  # torch's intra-op pool (XGBoost gets `nthread` from the budget)
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",  # numpy's BLAS
    "POLARS_MAX_THREADS",
    "NUMBA_NUM_THREADS",
)


def cores_given() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """The cgroup v2 CPU limit in cores (`cpu.max`: "200000 100000" is 2), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def steps_at_once() -> int:
    return _positive("EVENTML_STEPS_AT_ONCE", 1)


def step_threads() -> int:
    """The threads one CPU-heavy step uses (EVENTML_THREADS, or its share of the cores given)."""
    return _positive("EVENTML_THREADS", max(1, cores_given() // steps_at_once()))


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that give a process (a Ray worker, a child) a budget of `threads`: every
    library's pool, and eventml's own parallel parts (the feature kernels)."""
    return {"EVENTML_THREADS": str(threads), **{name: str(threads) for name in POOL_VARIABLES}}


def use_step_threads() -> int:
    """Size this process's pools to the step budget and return it. Call it before the libraries
    start their pools (an entry point's first lines); torch, imported already or not, follows
    too, since it can resize its pool at any time."""
    threads = step_threads()
    for name in POOL_VARIABLES:
        os.environ.setdefault(name, str(threads))
    if "torch" in sys.modules:
        omp = os.environ["OMP_NUM_THREADS"].split(",")[0]  # OpenMP allows a list per level
        sys.modules["torch"].set_num_threads(int(omp) if omp.isdigit() and int(omp) else threads)
    return threads


def _positive(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: set it to a whole number of at least 1, or unset it")
    return value
