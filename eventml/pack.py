"""The dataset pack: everything one event source needs, in one declarative file.

A pack is the event contract (`DatasetSpec`: columns, event types, decision events, labels,
bounds) plus what every later stage reads: the feature families, monotone constraints for the
scorers, evaluation segments, the decision policy per label, the promotion rule, the partition
range and, for a simulator, the oracle columns. A built-in world's pack is a file like any
user's (`eventml/worlds/<world>/pack.yaml`). Loading a pack checks every reference across its
sections and names the key and the fix; a label column is never an input (`DatasetSpec`).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from eventml.features import (
    FeatureFamilies,
    FeatureSet,
    build_feature_set,
    compute_features,
    key_activity,
    lookback_days,
)
from eventml.promotion import PromotionRules
from eventml.schema import DatasetSpec


class Segment(BaseModel):
    """A way to cut the test decisions for the evaluation: `feature` cut at `breaks`, one
    label per interval (`(-inf, b0]`, `(b0, b1]`, … `(bn, inf)`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    feature: str
    breaks: tuple[float, ...]
    labels: tuple[str, ...]

    @model_validator(mode="after")
    def _one_label_per_interval(self) -> Segment:
        if len(self.labels) != len(self.breaks) + 1:
            raise ValueError(
                f"segment {self.name!r}: {len(self.breaks)} breaks make "
                f"{len(self.breaks) + 1} intervals; give as many labels"
            )
        return self

    def expr(self) -> pl.Expr:
        return pl.col(self.feature).cut(list(self.breaks), labels=list(self.labels)).cast(pl.String)


class Partitions(BaseModel):
    """The daily partitions of the event-time assets: `days` days from `start`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: date
    days: int = Field(gt=0)

    @property
    def end(self) -> date:
        return self.start + timedelta(days=self.days)


class DatasetPack(DatasetSpec):
    features: FeatureFamilies = FeatureFamilies()
    # feature -> +1 (risk never falls as it grows) or -1: the scorers' monotone constraints.
    monotone: dict[str, Literal[-1, 1]] = Field(default_factory=dict)
    segments: tuple[Segment, ...] = ()
    # label -> the probability at which a decision is declined; every label has one.
    policy: dict[str, float] = Field(default_factory=dict)
    promotion: PromotionRules = PromotionRules()
    partitions: Partitions | None = None  # None: a year from the source's start

    @model_validator(mode="after")
    def _references(self) -> DatasetPack:
        problems = []
        try:
            names = set(self.feature_set().names)
        except ValueError as e:
            raise ValueError(str(e)) from None
        labels = [label.name for label in self.labels]
        if unknown := sorted(set(self.monotone) - names):
            problems.append(
                f"monotone: {unknown} are not features the families produce (see "
                "`python -m eventml.pack <pack.yaml>` for the names)"
            )
        for segment in self.segments:
            if segment.feature not in names:
                problems.append(
                    f"segments.{segment.name}.feature: {segment.feature!r} is not a feature the "
                    "families produce"
                )
        if unknown := sorted(set(self.policy) - set(labels)):
            problems.append(f"policy: {unknown} are not labels (have {labels})")
        if missing := [x for x in labels if x not in self.policy]:
            problems.append(
                f"policy: no decline threshold for {missing}; add `policy: {{{missing[0]}: 0.5}}` "
                "with the probability at which to decline"
            )
        if self.promotion.task is not None and self.promotion.task not in labels:
            problems.append(f"promotion.task: {self.promotion.task!r} is not a label ({labels})")
        if self.partitions and self.partitions.start < self.source_start.date():
            problems.append(
                f"partitions.start: {self.partitions.start} is before source_start "
                f"{self.source_start.date()}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def feature_set(self) -> FeatureSet:
        return build_feature_set(self, self.features)

    def activity_for(
        self, events: pl.DataFrame | pl.LazyFrame, decisions: pl.DataFrame
    ) -> pl.DataFrame:
        """The keys' activity that the decisions' keyed features read, from `events` (which
        must hold every event of the days before the decisions that the windows reach)."""
        fs = self.feature_set()
        days = decisions["ts"].dt.date()
        lookback = lookback_days(fs)
        start = self.source_start.date() if lookback is None else days.min() - timedelta(lookback)
        return key_activity(events, self, fs, start, days.max())

    def compute_features(
        self, events: pl.DataFrame | pl.LazyFrame, decisions: pl.DataFrame
    ) -> pl.DataFrame:
        """`eventml.features.compute_features` of this pack's feature set, with the activity of
        keyed families taken from the same events: for tables that hold every entity's events."""
        activity = self.activity_for(events, decisions) if decisions.height else None
        return compute_features(events, decisions, self.feature_set(), activity)

    @property
    def partition_range(self) -> Partitions:
        return self.partitions or Partitions(start=self.source_start.date(), days=365)

    @property
    def promotion_rules(self) -> PromotionRules:
        """The promotion rule with its task resolved: the first label unless the pack names one."""
        return self.promotion.model_copy(
            update={"task": self.promotion.task or self.labels[0].name}
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m eventml.pack PACK.yaml`: check a pack and list what it makes."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pack", help="path to a dataset pack (YAML)")
    pack = DatasetPack.from_yaml(parser.parse_args(argv).pack)
    features = pack.feature_set()
    days = pack.partition_range
    print(f"{pack.name}: valid")
    print(
        f"  labels: {', '.join(x.name for x in pack.labels)} (promotion on {pack.promotion_rules.task})"
    )
    print(f"  partitions: {days.days} days from {days.start}")
    print(f"  {len(features.names)} features: {', '.join(features.names)}")


if __name__ == "__main__":
    main()
