"""Batch inference on a Ray cluster with Ray Data: the encoders' outputs (embedding and
cross-fitted probability per task) for every decision, by parts of the decisions; and the
scorer's probabilities for every row of a model table, by blocks of it.

The decisions are ordered by entity shard, so a part holds few entities' decisions, and cut into
`parts` blocks, each one batch. A pool of `workers` actors each loads the encoders once (from
their saved files, not a pickle) and, per batch, reads only the batch's entities' events from
the events table at the version the step pinned: a worker holds a part's histories, never the
table. An entity cut across two parts has its events read by both; every output depends on the
entity's own events only, so the rows are those of `eventml.embedding.embedding_table` over the
whole table.
"""

from __future__ import annotations

import tempfile

import polars as pl
import pyarrow as pa

from eventml.cluster.workers import ONE_CPU, files_of, write_files
from eventml.embedding import SequenceModel, decision_keys, embedding_table
from eventml.features.sharded import shard_of_entity
from eventml.scorer import Scorer


class EmbedPart:
    """A Ray Data worker: the encoders loaded once, then a part of the decisions at a time."""

    def __init__(self, model_files: dict[str, bytes], events_uri: str, version: int | None):
        with tempfile.TemporaryDirectory() as tmp:
            self.model = SequenceModel.load(write_files(model_files, tmp))
        self.events_uri, self.version = events_uri, version

    def __call__(self, part: pa.Table) -> pa.Table:
        decisions = pl.from_arrow(part)
        entities = decisions["entity_id"].unique().implode()
        events = (
            pl.scan_delta(self.events_uri, version=self.version)
            .filter(pl.col("entity_id").is_in(entities))
            .select(self.model.sequence_spec.event_columns)
            .collect()
        )
        return embedding_table(self.model, events, decisions).to_arrow()


def embedding_table_by_parts(
    model: SequenceModel,
    events_uri: str,
    version: int | None,
    decisions: pl.DataFrame,
    parts: int,
    workers: int,
    cpus_per_worker: int = 1,
) -> pl.DataFrame:
    """`embedding_table` for `decisions` from the events table at `version`, computed by Ray Data
    on the cluster this process is connected to; rows in the decisions' order."""
    with tempfile.TemporaryDirectory() as tmp:
        files = files_of(model.save(tmp))
    ordered = decision_keys(decisions).sort(shard_of_entity(parts), "entity_id", "ts")
    kwargs = {"model_files": files, "events_uri": events_uri, "version": version}
    # A part is a batch: its entities' events are read once.
    table = _by_actors(EmbedPart, kwargs, _blocks(ordered, parts), workers, cpus_per_worker)
    return decisions.select("decision_id").join(
        table, on="decision_id", how="left", maintain_order="left"
    )


class ScorePart:
    """A Ray Data worker: the scorer loaded once (its boosters' UBJ files, not a pickle), then a
    block of the model table at a time."""

    def __init__(self, scorer_files: dict[str, bytes]):
        with tempfile.TemporaryDirectory() as tmp:
            self.scorer = Scorer.load(write_files(scorer_files, tmp))

    def __call__(self, block: pa.Table) -> pa.Table:
        return self.scorer.probability_table(pl.from_arrow(block)).to_arrow()


def probability_table_by_parts(
    scorer: Scorer, table: pl.DataFrame, parts: int, workers: int, cpus_per_worker: int = 1
) -> pl.DataFrame:
    """`Scorer.probability_table` of `table` (decision_id and the scorer's inputs), computed by
    Ray Data in `parts` blocks on the cluster this process is connected to; rows in the table's
    order. Each row's probabilities depend on that row alone: the same as in process, to the
    bit."""
    if table.height == 0:  # no block to give a worker
        return scorer.probability_table(table)
    with tempfile.TemporaryDirectory() as tmp:
        files = files_of(scorer.save(tmp))
    inputs = table.select("decision_id", *scorer.feature_names)
    scores = _by_actors(
        ScorePart, {"scorer_files": files}, _blocks(inputs, parts), workers, cpus_per_worker
    )
    return table.select("decision_id").join(
        scores, on="decision_id", how="left", maintain_order="left"
    )


def _blocks(frame: pl.DataFrame, parts: int) -> list[pa.Table]:
    """`frame` cut into at most `parts` blocks of consecutive rows."""
    size = max(1, -(-frame.height // parts))
    return [frame.slice(start, size).to_arrow() for start in range(0, frame.height, size)]


def _by_actors(
    actor: type, kwargs: dict, blocks: list[pa.Table], workers: int, cpus_per_worker: int
) -> pl.DataFrame:
    """`actor(**kwargs)`'s outputs for the blocks, each block one batch, by a pool of `workers`
    actors on the cluster this process is connected to (each made once); in no set order."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    outputs = ray.data.from_arrow(blocks).map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=None,
        batch_format="pyarrow",
        concurrency=workers,
        num_cpus=cpus_per_worker,
        runtime_env={"env_vars": ONE_CPU},
    )
    return pl.from_arrow(pa.concat_tables(ray.get(outputs.to_arrow_refs())))
