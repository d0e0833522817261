"""Group `features`: decision points with maturing labels, point-in-time features, splits."""

import dagster as dg
import numpy as np
import polars as pl

from eventml.features import features_for_one
from eventml.features.sharded import entity_shards, shard_features, staged_shard_features
from eventml.labels import build_decisions, decision_summary
from eventml.sources import DAY
from eventml.splits import (
    SplitConfig,
    check_splits,
    split_decisions,
    split_summary,
    with_person_folds,
)
from ml_assets.metadata import check_result, table_md
from ml_assets.partitions import daily, run_days
from resources.compute import CPU_POOL, Compute
from resources.delta import DeltaTables, StagedDays
from resources.sources import EventSource

SPLIT_CHECKS = (
    "no_decision_in_two_splits",
    "horizon_gap",
    "splits_not_empty",
    "label_rates_in_band",
)
PARITY_SAMPLE = 50


@dg.asset(group_name="features")
def decisions(
    context: dg.AssetExecutionContext, raw_events: pl.LazyFrame, event_source: EventSource
) -> pl.DataFrame:
    """Every decision point with its labels and their maturity, as of the latest event. Rebuilt
    whole as days arrive: each new day matures the labels of decisions one horizon older."""
    spec = event_source.spec()
    table = build_decisions(raw_events.drop(DAY).collect(), spec)
    summary = decision_summary(table, spec)
    context.add_output_metadata(
        {"dagster/row_count": table.height, "labels": summary, "preview": table_md(table)}
    )
    return table


@dg.asset(
    group_name="features",
    pool=CPU_POOL,
    partitions_def=daily,
    backfill_policy=dg.BackfillPolicy.single_run(),
    # Day D's features read every stored day up to D; the identity mapping records the newest.
    deps=["raw_events"],
    # New days of events refresh these partitions without anyone asking (the automation sensor).
    automation_condition=dg.AutomationCondition.eager(),
    metadata={"partition_expr": DAY},
    check_specs=[
        dg.AssetCheckSpec("point_in_time_parity", asset="decision_features", blocking=True)
    ],
)
def decision_features(
    context: dg.AssetExecutionContext,
    tables: DeltaTables,
    event_source: EventSource,
    compute: Compute,
):
    """Window aggregates per decision from the entity's events strictly before it; one day's
    decisions cost one day of work."""
    start, end = run_days(context)
    spec = event_source.spec()
    feature_set = spec.feature_set()
    # One version of the events for this process and every worker.
    events_uri, version = tables.uri("raw_events"), tables.version("raw_events")
    history = pl.scan_delta(events_uri, version=version).filter(pl.col(DAY) < end).drop(DAY)
    todays = (
        history.filter(
            (pl.col("ts").dt.date() >= start)
            & pl.col("event_type").is_in(spec.decision_event_types)
        )
        .rename({"event_id": "decision_id"})
        .collect()
    )
    # Keyed families (per terminal, per merchant) read every entity's events of the days before.
    activity = spec.activity_for(history, todays) if todays.height else None
    # By entity shard: one in this process, or the compute resource's parts on its Ray cluster,
    # where each shard writes its own rows under the table and the IO manager commits them all
    # (when the workers reach the table's folder: a local table, a cluster on this machine).
    shards = entity_shards(todays, compute.parts())
    calls = [(events_uri, version, end, part, feature_set.to_json(), activity) for part in shards]
    table_uri = tables.uri("decision_features")
    if compute.parts() > 1 and compute.workers_share_this_disk() and "://" not in table_uri:
        output, rows, nulls, hows = _staged(table_uri, calls, compute)
    else:
        done = compute.map(shard_features, calls)
        output = pl.concat([part for part, _ in done])
        rows, nulls, hows = output, output.null_count().row(0, named=True), [h for _, h in done]
    null_rates = (
        pl.DataFrame({n: [nulls[n] / max(todays.height, 1)] for n in feature_set.names})
        .unpivot(variable_name="feature", value_name="null_rate")
        .sort("null_rate", descending=True)
    )
    yield dg.Output(
        output,
        metadata={
            "dagster/row_count": todays.height,
            "features": len(feature_set.names),
            "highest_null_rates": table_md(null_rates, max_rows=15),
            "feature_set": dg.MetadataValue.json({"names": feature_set.names[:200]}),
            "compute": dg.MetadataValue.json({**compute.describe(), "shards": hows}),
        },
    )
    yield _parity_check(history, todays, rows, feature_set, activity)


def _staged(table_uri: str, calls: list[tuple], compute: Compute):
    """Each shard's rows written by its worker under the table (`StagedDays`, for the IO manager
    to commit); a lazy scan of them, the columns' null counts, and how each shard went."""
    done = compute.map(staged_shard_features, [(table_uri, *call) for call in calls])
    files = [f for shard_files, *_ in done for f in shard_files]
    nulls = {c: sum(counts[c] for *_, counts in done) for c in done[0][3]}
    schema = done[0][1]
    if any(shard_schema != schema for _, shard_schema, *_ in done):  # as a concat would refuse
        raise ValueError(f"decision_features: the shards' columns differ: {[d[1] for d in done]}")
    paths = [f"{table_uri}/{f['path']}" for f in files]
    scan = pl.scan_parquet(paths) if paths else pl.LazyFrame(schema=schema)  # days, no decisions
    return StagedDays(table_uri, files, schema), scan, nulls, [how for _, _, how, _ in done]


def _parity_check(
    history: pl.LazyFrame, todays: pl.DataFrame, table: pl.DataFrame | pl.LazyFrame, feature_set,
    activity,
) -> dg.AssetCheckResult:  # fmt: skip
    """Recompute a sample through the live-request path, from events strictly before each
    decision: a feature that saw the future, or batch/online drift, shows up as a mismatch."""
    sample = todays.sample(min(PARITY_SAMPLE, todays.height), seed=0)
    entities = history.filter(pl.col("entity_id").is_in(sample["entity_id"].implode())).collect()
    batch = table.lazy().filter(pl.col("decision_id").is_in(sample["decision_id"].implode()))
    batch = batch.collect()
    mismatches = []
    for decision in sample.iter_rows(named=True):
        online = features_for_one(
            entities.filter(pl.col("entity_id") == decision["entity_id"]),
            decision,
            feature_set,
            activity,
        )
        offline = batch.filter(pl.col("decision_id") == decision["decision_id"]).row(0, named=True)
        for name in feature_set.names:
            a, b = offline[name], online[name]
            same = (a is None and (b is None or (isinstance(b, float) and np.isnan(b)))) or (
                a is not None
                and b is not None
                and np.isclose(a, b, rtol=1e-9, atol=0, equal_nan=True)
            )
            if not same:
                mismatches.append(
                    {
                        "decision_id": decision["decision_id"],
                        "feature": name,
                        "batch": a,
                        "online": b,
                    }
                )
    return dg.AssetCheckResult(
        asset_key="decision_features",
        check_name="point_in_time_parity",
        passed=not mismatches,
        description=f"{len(mismatches)} mismatching values over {sample.height} decisions recomputed from prior events",
        metadata={"decisions_checked": sample.height, "mismatches": mismatches[:20]},
    )


class SplitSettings(dg.Config):
    valid_fraction: float = 0.2
    test_fraction: float = 0.2
    # Every label's positive rate in every split must fall in this band: outside it, the label
    # definition or the data is broken (no positives at all, or most decisions "defaulting").
    min_label_rate: float = 0.001
    max_label_rate: float = 0.5


@dg.asset(
    group_name="features",
    check_specs=[
        dg.AssetCheckSpec(name, asset="training_splits", blocking=True) for name in SPLIT_CHECKS
    ],
)
def training_splits(
    context: dg.AssetExecutionContext,
    config: SplitSettings,
    decisions: pl.DataFrame,
    event_source: EventSource,
):
    """Out-of-time train / valid / gap / test by decision time; the gap is at least the longest
    label horizon, so no training label matures inside the test window. Every row also gets its
    person's `fold`: one sequence encoder per fold learns from that fold's people only."""
    spec = event_source.spec()
    config = SplitConfig(
        valid_fraction=config.valid_fraction,
        test_fraction=config.test_fraction,
        label_rate_bands={
            label.name: (config.min_label_rate, config.max_label_rate) for label in spec.labels
        },
    )
    splits = with_person_folds(split_decisions(decisions, spec, config))
    yield dg.Output(
        splits,
        metadata={"dagster/row_count": splits.height, "splits": split_summary(splits, spec)},
    )
    for outcome in check_splits(splits, spec, config):
        yield check_result("training_splits", outcome)
