"""Point-in-time features by entity shard: what a worker of a cluster computes.

The decisions are split by entity (`entity_shards`): all of an entity's decisions fall in one
shard. A shard's features are computed from the events table itself (`shard_features`), read at
the version the run pinned; `compute_features` keeps only the shard's entities' events as it
scans, so a worker holds its shard's histories, never the table. Every feature depends on its own
entity's events only (keyed families on the keys' daily activity, which every shard gets whole),
so the shards' rows together are the in-process result, bit for bit.

On a cluster a shard also writes its rows itself (`staged_shard_features`): Parquet files under
the Delta table, one per day, which the step then commits in one transaction. The driver holds
the decisions and the shards' file lists, never the features.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import date
from pathlib import Path

import polars as pl

from eventml.features.batch import HASH_SEED, compute_features
from eventml.features.declare import FeatureSet
from eventml.sources import DAY


def shard_of_entity(shards: int) -> pl.Expr:
    """Which of `shards` parts a row's entity falls in: every step that cuts by entity cuts the
    same way within a process (polars' hash is stable within one, not across versions)."""
    return pl.col("entity_id").hash(HASH_SEED) % shards


def entity_shards(decisions: pl.DataFrame, shards: int) -> list[pl.DataFrame]:
    """The decisions in at most `shards` parts, each holding whole entities (empty parts left
    out), in a stable order."""
    if shards <= 1 or decisions.height == 0:
        return [decisions]
    shard = shard_of_entity(shards).alias("__shard")
    parts = decisions.with_columns(shard).partition_by("__shard", as_dict=True, include_key=False)
    return [parts[key] for key in sorted(parts)]


def shard_features(
    events_uri: str,
    version: int | None,
    end: date,
    decisions: pl.DataFrame,
    feature_set_json: str,
    activity: pl.DataFrame | None,
) -> tuple[pl.DataFrame, dict]:
    """One shard's rows of `decision_features` (each decision's id, entity, time and day, then
    its features) from the events of `events_uri` (a Delta table with a `day` column) at
    `version`, before day `end`; and how it went (rows, seconds, process)."""
    started = time.perf_counter()
    history = pl.scan_delta(events_uri, version=version).filter(pl.col(DAY) < end).drop(DAY)
    features = compute_features(
        history, decisions, FeatureSet.from_json(feature_set_json), activity
    )
    keys = decisions.select("decision_id", "entity_id", "ts", pl.col("ts").dt.date().alias(DAY))
    return keys.join(features, on="decision_id", how="left"), {
        "decisions": decisions.height,
        "seconds": round(time.perf_counter() - started, 3),
        "pid": os.getpid(),
    }


def staged_shard_features(
    table_uri: str, *shard: object
) -> tuple[list[dict], pl.Schema, dict, dict[str, int]]:
    """`shard_features(*shard)`, its rows written by this worker as Parquet files under the
    day-partitioned Delta table at `table_uri` (a local folder every worker reaches: see
    `resources.compute.Compute.workers_share_this_disk`), one per day, outside the table until
    the step commits them: a retried shard's lost attempt leaves files no commit names. Returns
    the files (path relative to the table, size, day, rows, modified_ms), the rows' schema, how
    it went, and each column's null count."""
    rows, how = shard_features(*shard)
    # Delta has no enum type: such columns are stored as text, as the IO manager stores a frame.
    rows = rows.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String))
    files = []
    for (day,), part in rows.partition_by(DAY, as_dict=True, include_key=False).items():
        relative = f"{DAY}={day:%Y-%m-%d}/part-{uuid.uuid4().hex}.parquet"
        path = Path(table_uri) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        part.write_parquet(path, compression="snappy")  # Delta's own writer's default
        stat = path.stat()
        files.append({"path": relative, "size": stat.st_size, "day": f"{day:%Y-%m-%d}",
                      "rows": part.height, "modified_ms": int(stat.st_mtime * 1000)})  # fmt: skip
    return files, rows.schema, how, rows.null_count().row(0, named=True)
