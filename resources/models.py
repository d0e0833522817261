"""The `model_io_manager`: model assets saved as directories by their own `save`, never pickled.

Each materialization writes a fresh folder `<root>/<asset>/<run id>/` and then moves the
`current` pointer to it, so a failed run never leaves a half-written model as the current one.
Loading rebuilds the object with the `load` classmethod of the class the asset declares in its
metadata (`{"model_class": "risk_model"}`), from a fixed list: nothing else is importable.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from eventml.embedding import SequenceModel
from eventml.risk_model import RiskModel
from eventml.scorer import Scorer

MODEL_CLASSES = {"sequence_model": SequenceModel, "scorer": Scorer, "risk_model": RiskModel}


class ModelIOManager(dg.ConfigurableIOManager):
    root: str

    def _folder(self, key: dg.AssetKey) -> Path:
        return Path(self.root, *key.path)

    def current_path(self, key: dg.AssetKey) -> Path:
        pointer = self._folder(key) / "current"
        if not pointer.exists():
            raise FileNotFoundError(
                f"{key.to_user_string()} has no saved model yet: materialize it first"
            )
        return self._folder(key) / pointer.read_text().strip()

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        folder = self._folder(context.asset_key)
        version = context.run_id
        obj.save(folder / version)
        tmp = folder / f".current.{version}"
        tmp.write_text(version)
        os.replace(tmp, folder / "current")  # atomic: readers see the old model or the new one
        context.add_output_metadata({"model_path": str(folder / version)})

    def load_input(self, context: dg.InputContext):
        kind = (context.upstream_output.definition_metadata or {}).get("model_class")
        if kind not in MODEL_CLASSES:
            raise ValueError(
                f"{context.asset_key.to_user_string()}: metadata model_class must be one of {sorted(MODEL_CLASSES)}"
            )
        return MODEL_CLASSES[kind].load(self.current_path(context.asset_key))
