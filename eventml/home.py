"""Where runtime state lives: one folder, `EVENTML_HOME` (default `.state/`).

Everything a run writes — Dagster's instance, Delta tables, MLflow, the BentoML store, the
landing zone, the online store — sits under it, so deleting it resets the system, unless a
setting moves a store to its production counterpart (`StateHome.tables_uri`, `.online_store`).
Stores that two processes may open first at the same moment are created under
`interprocess_lock`.
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
    def ray(self) -> Path:
        """Ray Train's runs and checkpoints on a local cluster."""
        return self.root / "ray"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # The settings that move a store off this folder to its production counterpart (the
    # Postgres one is `resources.state`'s: only Dagster and MLflow use it).

    @property
    def tables_uri(self) -> str:
        """EVENTML_TABLES_URI (e.g. s3://bucket/eventml), or the folder here."""
        return os.environ.get("EVENTML_TABLES_URI") or str(self.tables)

    def table_uri(self, table: str) -> str:
        return table_uri(self.tables_uri, table)

    @property
    def redis_url(self) -> str | None:
        """EVENTML_REDIS_URL: the online store and the event streams on Redis."""
        return os.environ.get("EVENTML_REDIS_URL") or None

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ValueError(
                "EVENTML_REDIS_URL is not set: the event stream lives on Redis "
                "(`make services` starts one; EVENTML_REDIS_URL=$(scripts/services.sh redis-url))"
            )
        return self.redis_url

    @property
    def online_store(self) -> str:
        """Where the online store lives: Redis when EVENTML_REDIS_URL is set, else a file here."""
        return self.redis_url or str(self.root / "online" / "store.sqlite")


def table_uri(root_uri: str, table: str, schema: str = "eventml") -> str:
    """A Delta table's location under the tables' root."""
    return f"{root_uri.rstrip('/')}/{schema}/{table}"


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
