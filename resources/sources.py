"""The `event_source` resource: which feed `raw_events` ingests, as typed config.

`kind="simulator"` (default) generates the synthetic lending world's days, with a small rate of
the faults real feeds have; `kind="landing"` admits the Parquet/CSV files a user drops into the
landing zone into its append-only log (`eventml.landing`) and reads the log, mapped onto the
event table by their dataset spec (YAML).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from eventml.home import StateHome
from eventml.landing import Arrival, admit, read_landed
from eventml.schema import DatasetSpec
from eventml.simulate import LENDING_SPEC, WorldConfig, date_of, day_of, iter_days
from eventml.sources import inject_faults


class EventSource(dg.ConfigurableResource):
    kind: Literal["simulator", "landing"] = "simulator"
    # The simulated world (ignored for the landing zone).
    n_users: int = WorldConfig.n_users
    start: str = WorldConfig.start
    n_days: int = WorldConfig.n_days
    seed: int = WorldConfig.seed
    shift_day: int | None = WorldConfig.shift_day
    shift_strength: float = WorldConfig.shift_strength
    # Shares of users who are fraudsters (small worlds raise them so every window sees fraud).
    bust_out_rate: float = WorldConfig.bust_out_rate
    stolen_identity_rate: float = WorldConfig.stolen_identity_rate
    # Share of simulated rows broken like a real feed breaks them (exercises `event_rejects`).
    fault_rate: float = 0.001
    # The landing zone and its spec; empty means `$EVENTML_HOME/landing` and `<landing>/spec.yaml`.
    landing_dir: str = ""
    spec_path: str = ""

    def world(self) -> WorldConfig:
        return WorldConfig(
            n_users=self.n_users,
            start=self.start,
            n_days=self.n_days,
            seed=self.seed,
            shift_day=self.shift_day,
            shift_strength=self.shift_strength,
            bust_out_rate=self.bust_out_rate,
            stolen_identity_rate=self.stolen_identity_rate,
        )

    @property
    def landing_path(self) -> Path:
        return Path(self.landing_dir) if self.landing_dir else StateHome.from_env().landing

    def spec(self) -> DatasetSpec:
        if self.kind == "simulator":
            return LENDING_SPEC
        path = Path(self.spec_path) if self.spec_path else self.landing_path / "spec.yaml"
        return DatasetSpec.from_yaml(path)

    def admit(self, partitions: tuple[date, date]) -> list[Arrival]:
        """Admit the landing zone's new files into its log; the new arrivals (none for the
        simulator)."""
        return admit(self.landing_path, self.spec(), partitions) if self.kind == "landing" else []

    def raw_rows(self, start: date, end: date) -> pl.DataFrame:
        """Rows of days [start, end) as delivered (text, plus a `source` column); the landing
        zone returns every row that ever landed, since rows are placed by their own timestamps
        downstream (call `admit` first for the files dropped since)."""
        if self.kind == "landing":
            return read_landed(self.landing_path, self.spec())
        world = self.world()
        days = range(max(day_of(world, start), 0), min(day_of(world, end), world.n_days))
        # Faults are drawn per day, and each day is its own source ("simulator/2025-03-01"), so a
        # day's rows and rejects are the same whichever run ingests it.
        frames = [
            inject_faults(events, self.fault_rate, seed=self.seed * 1_000_003 + day).with_columns(
                pl.lit(f"simulator/{date_of(world, day)}").alias("source")
            )
            for day, events in iter_days(world, days)
        ]
        if not frames:
            return pl.DataFrame(
                schema={c: pl.String for c in [*LENDING_SPEC.event_schema(), "source"]}
            )
        return pl.concat(frames)
