"""What a cluster's worker is given: its thread budget, and models as their saved files' bytes
(how weights travel to a worker without pickling a model)."""

from __future__ import annotations

from pathlib import Path

from eventml.threads import thread_environment

# A worker of one CPU: libraries that size their thread pools by the machine's cores would
# otherwise start as many threads per worker as the machine has, and workers side by side would
# oversubscribe it (read when each worker process imports them).
ONE_CPU = thread_environment(1)


def files_of(directory: str | Path) -> dict[str, bytes]:
    """Every file under `directory`, by its path relative to it."""
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write_files(files: dict[str, bytes], directory: str | Path) -> Path:
    """`files_of`'s files written back under `directory`; returns it."""
    root = Path(directory)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root
