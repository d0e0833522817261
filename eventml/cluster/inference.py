"""Batch inference on a Ray cluster with Ray Data: the encoder's outputs (embedding and its own
probability per task) for every decision, by parts of the decisions.

The decisions are ordered by entity shard, so a part holds few entities' decisions, and cut into
`parts` blocks, each one batch. A pool of `workers` actors each loads the encoder once (from its saved files,
not a pickle) and, per batch, reads only the batch's entities' events from the events table at
the version the step pinned: a worker holds a part's histories, never the table. An entity cut
across two parts has its events read by both; every output depends on the entity's own events
only, so the rows are those of `eventml.embedding.embedding_table` over the whole table.
"""

from __future__ import annotations

import tempfile

import polars as pl
import pyarrow as pa

from eventml.cluster.workers import ONE_CPU, files_of, write_files
from eventml.embedding import SequenceModel, embedding_table
from eventml.features.batch import HASH_SEED


class EmbedPart:
    """A Ray Data worker: the encoder loaded once, then a part of the decisions at a time."""

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
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        files = files_of(model.save(tmp))
    ordered = decisions.select("decision_id", "entity_id", "ts").sort(
        pl.col("entity_id").hash(HASH_SEED) % parts, "entity_id", "ts"
    )
    size = max(1, -(-ordered.height // parts))
    blocks = [ordered.slice(start, size).to_arrow() for start in range(0, ordered.height, size)]
    outputs = ray.data.from_arrow(blocks).map_batches(
        EmbedPart,
        fn_constructor_kwargs={"model_files": files, "events_uri": events_uri, "version": version},
        batch_size=None,  # a part is a batch: its entities' events are read once
        batch_format="pyarrow",
        concurrency=workers,
        num_cpus=cpus_per_worker,
        runtime_env={"env_vars": ONE_CPU},
    )
    table = pl.from_arrow(pa.concat_tables(ray.get(outputs.to_arrow_refs())))
    return decisions.select("decision_id").join(
        table, on="decision_id", how="left", maintain_order="left"
    )
