"""Where runtime state lives: one folder, `EVENTML_HOME` (default `.state/`).

Everything a run writes — Dagster's instance, Delta tables, MLflow, the BentoML store, the
landing zone, the online store — sits under it, so deleting it resets the system. Stores that
two processes may open first at the same moment are created under `interprocess_lock`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateHome:
    root: Path

    @classmethod
    def from_env(cls) -> StateHome:
        return cls(Path(os.environ.get("EVENTML_HOME", ".state")).expanduser().resolve())

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@contextmanager
def interprocess_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) against every other process on
    this machine; released when the block ends or the holder dies (flock, never a stale file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
