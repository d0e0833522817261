"""What the sequence encoder learns from: its rows, their outlook targets, and their sequences.

The rows (`learning_rows`) are chosen from the splits alone. A row's outlook targets and its
sequence arrays depend only on its own entity's events, so `EncoderData` builds them all at once
in one process, or by parts of whole entities (`EncoderData.by_entity`) where the events are: a
cluster's tasks each read only their entities' events from the table and build only their rows,
which are those rows of the whole build, exactly. No process then holds every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import polars as pl

from eventml.features.sharded import shard_of_entity
from eventml.labels import event_within
from eventml.schema import DatasetSpec
from eventml.sequences import SequenceSpec, build_sequences

# The column of a learning row that says whether its outlook targets are known (see
# `learning_rows`); the targets themselves are computed where the row's events are.
OUTLOOK_KNOWN = "__outlook_known"


@dataclass(frozen=True)
class EventTable:
    """A Delta table of events (`raw_events`) at a pinned version: what a cluster's workers read
    their entities' events from, so every worker reads the same events."""

    uri: str
    version: int | None = None

    def scan(self) -> pl.LazyFrame:
        return pl.scan_delta(self.uri, version=self.version)


def scan_of(events: pl.DataFrame | EventTable) -> pl.LazyFrame:
    return events.scan() if isinstance(events, EventTable) else events.lazy()


def outlook_targets(
    events: pl.DataFrame, rows: pl.DataFrame, event_types, days: int, known: pl.Expr
) -> pl.DataFrame:
    """One 0/1 column per event type, `<type>_<days>d`: does the person have such an event in
    the `days` after the decision; null where `known` is false.

    Why: a decision label takes its horizon (90 days for a default) plus the split's gap to
    become usable, so the encoder would learn only from the earliest, youngest histories, whose
    people have barely made a payment yet. What happens in the next month is known soon after,
    for far more people and for histories like the ones scored, and it is the stress the
    labels follow: late and missed payments, bursts of applications, delinquencies."""
    return rows.select(
        pl.when(known)
        .then(pl.lit(event_within(rows, events, event_type, days)))
        .alias(f"{event_type}_{days}d")
        for event_type in event_types
    )


def learning_rows(
    events: pl.DataFrame,
    splits: pl.DataFrame,
    spec: DatasetSpec,
    fold: int,
    outlook_days: int = 30,
) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """The rows the encoder of `fold` learns from, in a canonical order, and the names of their
    outlook targets: every `train` and `gap` history (the self-supervised task reads them all),
    with decision labels (where matured and applicable) only on the train rows of the fold's
    people (see `eventml.splits.with_person_folds`) and outlook targets (see `outlook_targets`)
    only where the outlook ends before the first test decision.

    No outlook target comes from a person whose train labels another fold's encoder learns, or
    who has a `valid` row: a gap row's outlook and a train or validation row's label are often
    the very same adverse event, and an encoder that fitted it recognises the person (their
    device, their habits) in those rows. The other folds' people then take this encoder's
    outputs (`eventml.embedding.SequenceModel.output_columns`), which know nothing of their outcomes, and
    validation is not flattered by them. Validation still is flattered on the fold's own
    people (train and valid are adjacent, so their train and valid labels can be one event);
    early-stopping on the other people only was measured and changed nothing (README, issue 5)."""
    learn = _rows(splits, spec, outlook_days, events["ts"].max(), fold)
    if outlook_days <= 0:
        return learn.drop(OUTLOOK_KNOWN), ()
    outlook = outlook_targets(events, learn, spec.event_types, outlook_days, pl.col(OUTLOOK_KNOWN))
    return pl.concat([learn.drop(OUTLOOK_KNOWN), outlook], how="horizontal"), tuple(outlook.columns)


def _rows(
    splits: pl.DataFrame,
    spec: DatasetSpec,
    outlook_days: int,
    events_end: datetime | None,
    fold: int,
) -> pl.DataFrame:
    """`learning_rows` without the outlook targets: which rows, their decision labels, and
    whether their outlook is known (`OUTLOOK_KNOWN`), from the splits and the events' last
    instant alone."""
    tasks = [label.name for label in spec.labels]
    learn = splits.filter(pl.col("split").is_in(["train", "gap"]))
    train = pl.col("split") == "train"
    seen = splits.filter((train & (pl.col("fold") != fold)) | (pl.col("split") == "valid"))
    unseen = ~pl.col("entity_id").is_in(seen["entity_id"].unique().implode())
    own_labels = train & (pl.col("fold") == fold)
    learn = learn.with_columns(
        pl.when(own_labels).then(pl.col(t)).otherwise(None).alias(t) for t in tasks
    ).sort("ts", "decision_id")  # a canonical order: same data, same model
    first_test = splits.filter(pl.col("split") == "test")["ts"].min()
    ends = pl.col("ts") + pl.duration(days=outlook_days)
    # The window (ts, ts + days] must have passed and end before the first test decision: no
    # outcome of the test window teaches the encoder.
    known = (ends <= events_end) & unseen
    if first_test is not None:
        known = known & (ends < first_test)
    return learn.with_columns(known.fill_null(False).alias(OUTLOOK_KNOWN))


@dataclass(frozen=True)
class EncoderData:
    """The encoder's learning rows (`learning_rows` less the outlook targets) and validation
    rows, the coding of their histories, and the events those are built from."""

    learn: pl.DataFrame
    valid: pl.DataFrame
    events: pl.DataFrame | EventTable
    sequence_spec: SequenceSpec
    tasks: tuple[str, ...]
    outlook_days: int
    max_len: int

    @classmethod
    def of(
        cls,
        events: pl.DataFrame | EventTable,
        splits: pl.DataFrame,
        spec: DatasetSpec,
        sequence_spec: SequenceSpec,
        outlook_days: int,
        max_len: int,
        fold: int,
    ) -> EncoderData:
        """What the encoder of `fold` learns from (`learning_rows`) and early-stops on (every
        `valid` row)."""
        keys = ["decision_id", "entity_id", "ts", *(label.name for label in spec.labels)]
        events_end = scan_of(events).select(pl.col("ts").max()).collect().item()
        learn = _rows(splits, spec, outlook_days, events_end, fold)
        valid = splits.filter(pl.col("split") == "valid").sort("ts", "decision_id")
        return cls(
            learn=learn.select(*keys, OUTLOOK_KNOWN),
            valid=valid.select(keys),
            events=events,
            sequence_spec=sequence_spec,
            tasks=tuple(label.name for label in spec.labels),
            outlook_days=outlook_days,
            max_len=max_len,
        )

    @property
    def outlook(self) -> tuple[str, ...]:
        """The outlook targets' names, `<event type>_<days>d` (none without an outlook)."""
        if self.outlook_days <= 0:
            return ()
        return tuple(f"{t}_{self.outlook_days}d" for t in self.sequence_spec.event_types)

    def summary(self) -> str:
        labelled = self.learn.select(pl.any_horizontal(pl.col(self.tasks).is_not_null()).sum())
        with_outlook = int(self.learn[OUTLOOK_KNOWN].sum()) if self.outlook else 0
        return (
            f"sequences: {self.learn.height:,} to learn from ({labelled.item():,} with decision "
            f"labels, {with_outlook:,} with {self.outlook_days}-day outlook targets), "
            f"{self.valid.height:,} to validate"
        )

    def by_entity(self, parts: int) -> list[EncoderData]:
        """This data in at most `parts` parts of whole entities (a hash of the entity, so each
        part spans the whole period), each part's rows in this data's order. Events held here
        are cut the same way; a table is read by each part for its own entities."""
        shard = shard_of_entity(parts)
        cut = {
            name: frame.with_columns(shard.alias("__part")).partition_by("__part", as_dict=True)
            for name, frame in (("learn", self.learn), ("valid", self.valid))
        }
        keys = sorted(set(cut["learn"]) | set(cut["valid"]))
        out = []
        for key in keys:
            learn, valid = (
                cut[name].get(key, getattr(self, name).clear()).drop("__part", strict=False)
                for name in ("learn", "valid")
            )
            events = self.events
            if isinstance(events, pl.DataFrame):
                events = events.filter(shard == key[0])
            out.append(replace(self, learn=learn, valid=valid, events=events))
        return out

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The learning rows' arrays (their decision labels in `labels`, outlook targets in
        `outlook`) and the validation rows' arrays (their labels), built from these rows'
        entities' events."""
        events = self.events
        if isinstance(events, EventTable):
            entities = pl.concat([self.learn["entity_id"], self.valid["entity_id"]]).unique()
            events = (
                events.scan()
                .filter(pl.col("entity_id").is_in(entities.implode()))
                .select(self.sequence_spec.event_columns)
                .collect()
            )
        learn = self.learn
        if self.outlook:
            known = pl.col(OUTLOOK_KNOWN)
            targets = outlook_targets(
                events, learn, self.sequence_spec.event_types, self.outlook_days, known
            )
            learn = pl.concat([learn, targets], how="horizontal")
        spec, length = self.sequence_spec, self.max_len
        train = build_sequences(
            events, learn, spec, length, label_columns=self.tasks + self.outlook
        )
        if "labels" in train:
            train["labels"], train["outlook"] = np.split(train["labels"], [len(self.tasks)], axis=1)
        valid = build_sequences(events, self.valid, spec, length, label_columns=self.tasks)
        return train, valid
