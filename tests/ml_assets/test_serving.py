"""The online store asset: a run publishes exactly its days of raw_events, and re-running any
days replaces them rather than adding to them, on SQLite and on Redis."""

import dagster as dg
import polars as pl
import pytest

from eventml.worlds.lending import PACK as LENDING_PACK
from ml_assets.ingest import ingest
from ml_assets.serving import online_store
from resources.bento import Serving


def _count(serving: Serving, entity_ids: list[str]) -> dict:
    """entity/event -> ts of every event the store holds for these entities."""
    stored = serving.store(LENDING_PACK).histories(entity_ids)
    return {f"{e}/{i}": ts for e, i, ts in stored.select("entity_id", "event_id", "ts").iter_rows()}


@pytest.fixture(params=["sqlite", "redis"])
def serving(request, tmp_path) -> Serving:
    """The embedded store and, where `EVENTML_REDIS_URL` would put it, Redis."""
    redis = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Serving.under(tmp_path, online_store=redis)


def test_online_store_holds_each_published_day_once(
    serving, tables, small_world, instance, range_tags, resources_for
):
    resources = {**resources_for(tables, small_world), "serving": serving}
    days = range_tags("2025-01-01", "2025-01-04")
    dg.materialize([ingest, online_store], resources=resources, tags=days, instance=instance)
    raw = tables.scan("raw_events").collect()
    entity_ids = raw["entity_id"].unique().to_list()
    first = _count(serving, entity_ids)
    assert len(first) == raw.height and set(first) == {
        f"{e}/{i}" for e, i in raw.select("entity_id", "event_id").iter_rows()
    }

    # Re-publishing all the days, then one of them, changes nothing.
    result = dg.materialize(
        [ingest, online_store],
        selection=["online_store"],
        resources=resources,
        tags=days,
        instance=instance,
    )
    assert _count(serving, entity_ids) == first
    one_day = dg.materialize(
        [ingest, online_store],
        selection=["online_store"],
        resources=resources,
        partition_key="2025-01-02",
        instance=instance,
    )
    assert _count(serving, entity_ids) == first
    meta = one_day.asset_materializations_for_node("online_store")[0].metadata
    day2 = raw.filter(pl.col("ts").dt.date() == pl.date(2025, 1, 2)).height
    assert meta["events_deleted"].value == meta["events_written"].value == day2
    assert (
        result.asset_materializations_for_node("online_store")[0].metadata["events"].value
        == raw.height
    )

    # The service's read path sees an entity's events strictly before a given instant.
    entity = raw["entity_id"][0]
    cut = raw.filter(pl.col("entity_id") == entity)["ts"].max()
    history = serving.store(LENDING_PACK).history(entity, before=cut)
    assert (
        history.height == raw.filter((pl.col("entity_id") == entity) & (pl.col("ts") < cut)).height
    )
