"""The `event_source` resource: which dataset pack a deployment runs, and which feed
`raw_events` ingests, as typed config.

`pack` is a built-in world's name (`eventml/worlds/`) or the path of a pack file of one's own.
`kind="simulator"` (default) generates a built-in world's days, with a small rate of the faults
real feeds have; `kind="landing"` admits the Parquet/CSV files a user drops into the landing zone
into its append-only log (`eventml.landing`) and reads the log, mapped by the pack;
`kind="stream"` reads the days the stream consumer validated and landed (`eventml.stream`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import polars as pl

from eventml.home import StateHome
from eventml.landing import Arrival, admit, read_landed, read_reference_files
from eventml.pack import DatasetPack
from eventml.schema import Reference
from eventml.sources import ingest_days, inject_faults
from eventml.stream.landed import EVENTS, REJECTS, complete_day_counts, landed_days
from eventml.validation import Validated
from eventml.worlds import load_pack, selected_pack, world
from resources.delta import DeltaTables


class EventSource(dg.ConfigurableResource):
    pack: str = selected_pack()
    kind: Literal["simulator", "landing", "stream"] = "simulator"
    # The simulated world (ignored for the landing zone); unset fields keep the world's defaults.
    n_users: int | None = None
    n_days: int | None = None
    seed: int | None = None
    # Any other field of the world's WorldConfig (e.g. the lending world's `shift_day`).
    world_options: dict[str, Any] = {}
    # Share of simulated rows broken like a real feed breaks them (exercises `event_rejects`).
    fault_rate: float = 0.001
    # The landing zone; empty means `$EVENTML_HOME/landing`.
    landing_dir: str = ""
    # The stream: how far (event time) past a day's end the newest landed event must be before
    # the day is ingested; an event later still asks for the day again.
    stream_lateness_minutes: int = 15

    def world(self):
        """The simulated world's config (a built-in world's `WorldConfig`)."""
        module = world(self.pack)
        given = {"n_users": self.n_users, "n_days": self.n_days, "seed": self.seed}
        return module.WorldConfig(
            **{k: v for k, v in given.items() if v is not None}, **self.world_options
        )

    @property
    def landing_path(self) -> Path:
        return Path(self.landing_dir) if self.landing_dir else StateHome.from_env().landing

    def spec(self) -> DatasetPack:
        return load_pack(self.pack)

    def admit(self, partitions: tuple[date, date]) -> list[Arrival]:
        """Admit the landing zone's new files into its log; the new arrivals (none for the
        simulator)."""
        return admit(self.landing_path, self.spec(), partitions) if self.kind == "landing" else []

    def validated_days(self, start: date, end: date, partitions: tuple[date, date],
                       tables: DeltaTables) -> Validated:  # fmt: skip
        """The clean events and the rejects of the days [start, end), each with its `day`
        (`partitions`: [first, end) of all partition days): the stream's as its consumer
        validated them, the others' validated here."""
        if self.kind == "stream":
            return landed_days(tables.uri(EVENTS), tables.uri(REJECTS), start, end, self.spec())
        raw = self.raw_rows(start, end)
        return ingest_days(raw, self.spec(), start, end, datetime.now(UTC), partitions)

    def complete_stream_days(self, tables: DeltaTables) -> dict[date, int]:
        """Rows the stream landed per complete day (`eventml.stream.landed`)."""
        lateness = timedelta(minutes=self.stream_lateness_minutes)
        return complete_day_counts(tables.uri(EVENTS), tables.uri(REJECTS), lateness)

    def raw_rows(self, start: date, end: date) -> pl.DataFrame:
        """Rows of days [start, end) as delivered (text, plus a `source` column); the landing
        zone returns every row that ever landed, since rows are placed by their own timestamps
        downstream (call `admit` first for the files dropped since)."""
        if self.kind == "landing":
            return read_landed(self.landing_path, self.spec())
        module, config = world(self.pack), self.world()
        days = range(
            max(module.day_of(config, start), 0), min(module.day_of(config, end), config.n_days)
        )
        # Faults are drawn per day, and each day is its own source ("simulator/2025-03-01"), so a
        # day's rows and rejects are the same whichever run ingests it.
        frames = [
            inject_faults(events, self.fault_rate, seed=config.seed * 1_000_003 + day).with_columns(
                pl.lit(f"simulator/{module.date_of(config, day)}").alias("source")
            )
            for day, events in module.iter_days(config, days)
        ]
        if not frames:
            return pl.DataFrame(
                schema={c: pl.String for c in [*self.spec().event_schema(), "source"]}
            )
        return pl.concat(frames)

    def reference_rows(self, ref: Reference) -> tuple[pl.DataFrame, dict[str, str]]:
        """The reference table's rows as delivered (with `source`), and the files that could not
        be read with why: the landing zone's `references/<name>/` files, or the simulated
        world's table over its whole span (each row holds only from its own time on)."""
        if self.kind == "landing":
            return read_reference_files(self.landing_path, ref, self.spec())
        module = world(self.pack)
        tables = module.references(self.world()) if hasattr(module, "references") else {}
        if ref.name not in tables:
            raise ValueError(
                f"the pack declares reference table {ref.name!r} but world {self.pack!r} makes "
                f"{sorted(tables) or 'none'}"
            )
        return tables[ref.name].with_columns(pl.lit(f"simulator/{ref.name}").alias("source")), {}
