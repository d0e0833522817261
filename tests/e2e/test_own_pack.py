"""A user's own events, end to end: a pack in the user's column names and CSV files in the
landing zone become tables, a trained and evaluated model, a promoted champion, a built Bento
and a served request, with nothing in the code knowing this source (tests/returns_world.py)."""

import polars as pl
import pytest
import returns_world
from whole_graph import served_request, whole_graph

from eventml.pack import DatasetPack
from resources.sources import EventSource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def marketplace(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_pack")
    pack_path = returns_world.land(root / "landing", returns_world.events())
    source = EventSource(kind="landing", landing_dir=str(root / "landing"), pack=str(pack_path))
    # The last whole day of orders: the files end there.
    with whole_graph(root, source, ("2025-01-01", "2025-05-30")) as built:
        yield {**built, "pack": DatasetPack.from_yaml(pack_path)}


def test_the_files_become_the_events_of_the_users_own_contract(marketplace):
    events = marketplace["tables"].scan("raw_events").collect()
    assert set(events["event_type"].unique()) == {"visit", "order", "return_request"}
    assert {"shop", "basket_items", "was_disputed"} <= set(events.columns)
    assert marketplace["tables"].scan("event_rejects").collect().height == 0


def test_every_event_takes_its_shops_return_window_as_of_its_own_time(marketplace):
    """The shops' terms are a reference table keyed by another column than the customer, each
    row in force from its date: an order before a shop's change has the old window, after it
    the new one."""
    events = marketplace["tables"].scan("raw_events").collect()
    expected = [returns_world.return_days(s, t) for s, t in events.select("shop", "ts").rows()]
    assert events["return_days"].to_list() == expected
    assert events["return_days"].n_unique() == 2
    stored = marketplace["tables"].scan("reference_shops").collect()
    assert stored.height == len(returns_world.TERMS)


def test_the_model_learns_both_labels_and_is_judged_out_of_time(marketplace):
    evaluation = marketplace["tables"].scan("model_evaluation").collect()
    challenger = evaluation.filter(pl.col("model") == "challenger")
    assert set(challenger["task"]) == {"returned_14d", "disputed"}
    # The planted signal (earlier returns, basket size, earlier disputes) is learnable.
    assert (challenger["auc"] > 0.6).all(), evaluation.select("model", "task", "auc").rows()


def test_the_first_model_is_promoted_on_the_packs_task(marketplace):
    audit = marketplace["tables"].scan("champion").collect()
    assert audit["action"].to_list() == ["promoted"]


def test_the_built_bento_serves_the_packs_own_request(marketplace):
    result = marketplace["result"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["served_equals_offline"].passed, checks["served_equals_offline"].description
    answer, docs = served_request(marketplace)
    assert answer.status_code == 200, answer.text
    scored = answer.json()
    assert set(scored["probabilities"]) == {"returned_14d", "disputed"}
    assert scored["decision"] in ("approve", "decline")
    # The OpenAPI document describes the marketplace's own fields, never its label column.
    schemas = docs["components"]["schemas"]
    fields = set(next(v for k, v in schemas.items() if k.startswith("ScoreRequest"))["properties"])
    assert {"shop", "basket_items"} <= fields and "was_disputed" not in fields
    # The server attaches the shop's return window itself: no request carries it.
    assert "return_days" not in fields
