"""Where runtime state lives: one folder, `EVENTML_HOME` (default `.state/`).

Everything a run writes — Dagster's instance, Delta tables, MLflow, the BentoML store, the
landing zone, the online store — sits under it, so deleting it resets the system.
"""

from __future__ import annotations

import os
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
