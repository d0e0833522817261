"""`make migrate`: bring the tables in line with the dataset pack after the pack changed.

    python -m ml_assets.migrate [--dry-run]

Changing a pack (a new column, a new feature family, another label) leaves tables written
under the old one: a daily table keeps the schema of its first write, so the next run of a
changed asset would fail (`resources.delta.PackChangedError` names this command). What a
migration does, in this order, each step a no-op when nothing changed:

- **Source tables evolve.** `raw_events` and `event_rejects` (which keeps rejected rows as
  text) gain the pack's new columns, null on the days that arrived before them; a column the
  pack no longer declares is kept, null from now on. Nothing that arrived is rewritten or lost.
- **Derived daily tables start a new generation.** When the features or the labels changed,
  the old `decision_features` and the monitoring tables (`served_predictions`,
  `feature_drift`, `live_performance`: they judged models of the old pack) are moved under
  `<tables>/_retired/<time>/` and Dagster forgets their partitions.
- **The features and the online store are rebuilt** over every ingested day, in one Dagster
  run, from the evolved `raw_events`.

Unpartitioned tables (decisions, splits, models, evaluation) are rewritten whole by their next
run, schema and all, so the next training (`make demo`, or `retrain_job` in the UI) finishes
the change: a champion trained under the old pack keeps serving its own pack until then.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import dagster as dg
import polars as pl

from eventml.home import StateHome
from eventml.pack import DatasetPack
from eventml.sources import DAY
from resources.delta import COMPANION_OF, DeltaTables
from resources.state import dagster_home, prepare

# Written from the pack's features or labels, day by day; rebuilt or restarted on a change.
REBUILT = ("decision_features",)
MONITORING = ("served_predictions", "feature_drift", "live_performance")
DECISION_KEYS = ("decision_id", "entity_id", "ts", DAY)


@dataclass
class Migration:
    """What the tables need to match `pack`: nothing when `needed` is False."""

    # Per source table, the columns to add; and the raw columns the pack no longer declares.
    columns: dict[str, dict[str, pl.DataType]] = field(default_factory=dict)
    retired_columns: list[str] = field(default_factory=list)  # kept, null from now on
    stale: list[str] = field(default_factory=list)  # derived tables to retire
    days: tuple[str, str] | None = None  # the ingested days to rebuild, first and last

    @property
    def needed(self) -> bool:
        return bool(self.columns or self.stale)

    def describe(self) -> list[str]:
        if not self.needed:
            return ["the tables match the pack: nothing to migrate"]
        lines = []
        for table, columns in self.columns.items():
            lines.append(f"{table}: add {', '.join(columns)} (null on earlier days)")
        if self.retired_columns:
            lines.append(f"raw_events: keep {', '.join(self.retired_columns)}, which the "
                         "pack no longer declares (null from now on)")  # fmt: skip
        if self.stale:
            lines.append(f"retire {', '.join(self.stale)} (kept under _retired/)")
        if self.days:
            lines.append(f"rebuild decision_features and online_store over {self.days[0]}.."
                         f"{self.days[1]}")  # fmt: skip
        return lines


def plan(tables: DeltaTables, pack: DatasetPack) -> Migration:
    """Compare the stored schemas with what `pack` writes."""
    migration = Migration()
    raw = tables.schema("raw_events")
    if raw is None:
        return migration  # nothing ingested yet: the first run writes the pack's schema
    expected = {**pack.event_schema(), DAY: pl.Date}
    if added := {k: v for k, v in expected.items() if k not in raw}:
        migration.columns["raw_events"] = added
    migration.retired_columns = [k for k in raw if k not in expected]
    rejects = tables.schema("event_rejects")  # rejected rows, every event column as text
    if rejects is not None and (added := [k for k in pack.event_schema() if k not in rejects]):
        migration.columns["event_rejects"] = dict.fromkeys(added, pl.String)
    features = tables.schema("decision_features")
    served = tables.schema("served_predictions")
    names = set(DECISION_KEYS) | set(pack.feature_set().names)
    scores = {f"p_{label.name}" for label in pack.labels}
    if (features is not None and set(features) != names) or (
        served is not None and not scores <= set(served)
    ):  # the features or the labels changed: a new generation of derived tables
        migration.stale = [t for t in (*REBUILT, *MONITORING) if tables.schema(t) is not None]
    if migration.needed:
        days = tables.scan("raw_events").select(pl.col(DAY).min().alias("a"), pl.col(DAY).max())
        first, last = days.collect().row(0)
        migration.days = (first.isoformat(), last.isoformat())
    return migration


def apply(migration: Migration, assets: list, resources: dict, instance) -> None:
    """Carry out `migration`: evolve raw_events, retire the stale tables (and Dagster's record
    of their partitions), rebuild the features and the online store in one run."""
    tables: DeltaTables = resources["tables"]
    # A companion (event_rejects) first: its main table's commit names its new version.
    for table in sorted(migration.columns, key=lambda t: t not in COMPANION_OF):
        tables.add_columns(table, migration.columns[table])
    if migration.stale:
        tables.retire(migration.stale)
        instance.wipe_assets([dg.AssetKey(t) for t in migration.stale])
    if migration.days:
        result = dg.materialize(
            assets, selection=["decision_features", "online_store"],
            resources=resources, instance=instance,
            tags={"dagster/asset_partition_range_start": migration.days[0],
                  "dagster/asset_partition_range_end": migration.days[1],
                  "eventml/trigger": "migrate"},
        )  # fmt: skip
        if not result.success:
            raise RuntimeError(f"rebuilding the features failed: run {result.run_id} in the UI")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = ap.parse_args()
    home = StateHome.from_env()
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home(home)))
    prepare(home)
    from ml_assets.definitions import build_definitions, build_resources

    resources = build_resources(home)
    pack = resources["event_source"].spec()
    migration = plan(resources["tables"], pack)
    print(f"pack {pack.name}: " + "\n  ".join(migration.describe()))
    if args.dry_run or not migration.needed:
        return 0
    with dg.DagsterInstance.get() as instance:
        apply(migration, list(build_definitions(resources).assets), resources, instance)
    print("migrated: the next training run (make demo, or retrain_job) trains on the new pack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
