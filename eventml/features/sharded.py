"""Point-in-time features by entity shard: what a worker of a cluster computes.

The decisions are split by entity (`entity_shards`): all of an entity's decisions fall in one
shard. A shard's features are computed from the events table itself (`shard_features`), read at
the version the run pinned; `compute_features` keeps only the shard's entities' events as it
scans, so a worker holds its shard's histories, never the table. Every feature depends on its own
entity's events only (keyed families on the keys' daily activity, which every shard gets whole),
so the shards' rows together are the in-process result, bit for bit.
"""

from __future__ import annotations

import os
import time
from datetime import date

import polars as pl

from eventml.features.batch import HASH_SEED, compute_features
from eventml.features.declare import FeatureSet
from eventml.sources import DAY


def entity_shards(decisions: pl.DataFrame, shards: int) -> list[pl.DataFrame]:
    """The decisions in at most `shards` parts, each holding whole entities (empty parts left
    out), in a stable order."""
    if shards <= 1 or decisions.height == 0:
        return [decisions]
    shard = (pl.col("entity_id").hash(HASH_SEED) % shards).alias("__shard")
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
    """One shard's features from the events of `events_uri` (a Delta table with a `day`
    column) at `version`, before day `end`; and how it went (rows, seconds, process)."""
    started = time.perf_counter()
    history = pl.scan_delta(events_uri, version=version).filter(pl.col(DAY) < end).drop(DAY)
    features = compute_features(
        history, decisions, FeatureSet.from_json(feature_set_json), activity
    )
    return features, {
        "decisions": decisions.height,
        "seconds": round(time.perf_counter() - started, 3),
        "pid": os.getpid(),
    }
