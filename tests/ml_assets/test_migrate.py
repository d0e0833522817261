"""Changing a pack is a supported act: a user's marketplace adds a column and a feature window
after two months of files; the next run fails with an error naming `make migrate`, and after
the migration every stored row is still there, the old days hold the new column as null, the
features are rebuilt with the new window, and the new files ingest."""

from pathlib import Path

import dagster as dg
import polars as pl
import returns_world

from ml_assets.features import decision_features
from ml_assets.ingest import ingest, references
from ml_assets.migrate import apply, plan
from ml_assets.serving import online_store
from resources.bento import Serving
from resources.sources import EventSource

ASSETS = [references, ingest, decision_features, online_store]
DAILY = ["raw_events", "event_rejects", "decision_features", "online_store"]
GROWN = returns_world.PACK.replace(
    "numeric: [basket_items, was_disputed, return_days]",
    "numeric: [basket_items, was_disputed, return_days, coupon]",
).replace("windows: [7d, 30d, all]", "windows: [7d, 30d, 90d, all]")


def test_a_grown_pack_is_migrated_and_nothing_stored_is_lost(
    tmp_path, tables, instance, range_tags, resources_for
):
    zone = tmp_path / "landing"
    # Enough customers that no March day is an outlier to the daily_volume check.
    frame = returns_world.events(n_customers=200, n_days=90)
    month = pl.col("when").str.slice(0, 7)
    pack_path = returns_world.land(zone, frame.filter(month < "2025-03"))
    source = EventSource(kind="landing", landing_dir=str(zone), pack=str(pack_path))
    resources = {**resources_for(tables, source), "serving": Serving.under(tmp_path)}

    def run(first, last):
        return dg.materialize(ASSETS, selection=DAILY, resources=resources, instance=instance,
                              tags=range_tags(first, last), raise_on_error=False)  # fmt: skip

    made = dg.materialize(ASSETS, selection=["references"], resources=resources, instance=instance)
    assert made.success and run("2025-01-01", "2025-02-28").success
    before = tables.scan("raw_events").collect()

    # The marketplace starts sending a coupon value with each order, and wants a 90-day window.
    pack_path.write_text(GROWN)
    march = frame.filter(month == "2025-03").with_columns(
        pl.when(pl.col("what") == "order").then(pl.lit("5")).alias("coupon")
    )
    march.write_csv(zone / "orders-2025-03.csv")
    failed = run("2025-03-01", "2025-03-31")
    assert not failed.success
    (error,) = [e for e in failed.all_events if e.is_step_failure]
    message = error.step_failure_data.error.to_string()  # with its cause
    assert "coupon" in message and "make migrate" in message

    migration = plan(tables, source.spec())
    assert {t: list(c) for t, c in migration.columns.items()} == {
        "raw_events": ["coupon"],
        "event_rejects": ["coupon"],
    }
    assert migration.stale == ["decision_features"]
    apply(migration, ASSETS, resources, instance)

    assert tables.scan("event_rejects").collect_schema()["coupon"] == pl.String
    evolved = tables.scan("raw_events").collect()
    assert evolved.height == before.height  # nothing rewritten or lost
    assert evolved["coupon"].null_count() == evolved.height
    features = tables.scan("decision_features").collect()
    orders = before.filter(pl.col("event_type") == "order").height
    assert features.height == orders and features["n_order_90d"].null_count() == 0
    assert plan(tables, source.spec()).needed is False

    assert run("2025-03-01", "2025-03-31").success
    landed = tables.scan("raw_events").filter(pl.col("event_type") == "order").collect()
    assert (
        landed.filter(pl.col("coupon") == 5.0).height
        == march.filter(pl.col("what") == "order").height
    )
    # The old generation of features stays readable beside the tables.
    (retired,) = Path(tables.uri("_retired")).glob("*/decision_features")
    assert pl.scan_delta(str(retired)).collect().height == orders
