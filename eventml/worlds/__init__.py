"""The built-in worlds, one folder each: its dataset pack (`pack.yaml`) and its simulator.

A world module exposes `PACK`, `WorldConfig` (with `n_users`, `n_days`, `start`, `seed`),
`iter_days`, `simulate`, `date_of`, `day_of`, and what `make demo` runs (`DEMO_DAYS`, and
`DEMO_CONFIG`: a run config for its size and training); nothing outside its folder knows its
events.
Which pack a deployment runs is `EVENTML_PACK`: a built-in world's name or a pack file's path.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from eventml.pack import DatasetPack

WORLDS = ("lending", "cards")
DEFAULT_WORLD = "lending"


def selected_pack() -> str:
    """The pack this deployment runs (`EVENTML_PACK`), the lending world by default."""
    return os.environ.get("EVENTML_PACK") or DEFAULT_WORLD


def world(name: str) -> ModuleType:
    if name not in WORLDS:
        raise ValueError(
            f"{name!r} is not a built-in world ({', '.join(WORLDS)}); a simulator runs only for "
            "a built-in world: set the event source to `landing` for a pack of your own"
        )
    return importlib.import_module(f"eventml.worlds.{name}")


def load_pack(ref: str) -> DatasetPack:
    """A built-in world's pack by name, or a pack file by path."""
    if ref in WORLDS:
        return world(ref).PACK
    return DatasetPack.from_yaml(Path(ref))
