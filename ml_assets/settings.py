"""Run config made from the `eventml` dataclasses it configures, so each setting is declared once.

A step's Dagster config (what the launchpad shows and a run config sets) is generated from the
dataclass the step passes to `eventml`: its fields, types and defaults, nothing typed twice. A
field that the dataset pack owns (a scorer's monotone constraints) is left out.
"""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg
import pydantic


def settings_of(
    config: type, name: str, doc: str, exclude: tuple[str, ...] = ()
) -> type[dg.Config]:
    """A `dg.Config` class with the dataclass `config`'s fields (but `exclude`) and defaults;
    `.make()` on an instance gives the dataclass back, with any extra fields given."""
    hints = typing.get_type_hints(config)
    fields = {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(config)
        if f.name not in exclude and f.default is not dataclasses.MISSING
    }

    def make(self, **extra):
        return config(**self.model_dump(), **extra)

    settings = pydantic.create_model(name, __base__=dg.Config, __doc__=doc, **fields)
    settings.make = make
    return settings
