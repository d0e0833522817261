"""The card world, end to end on a small world: every payment a decision, fraud as a column
label confirmed days later, the whole graph to a served payment; nothing in the code is special
to it (its pack is eventml/worlds/cards/pack.yaml)."""

import polars as pl
import pytest
from whole_graph import served_request, whole_graph

from resources.sources import EventSource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def card_world(tmp_path_factory):
    source = EventSource(pack="cards", n_users=250, n_days=90, fault_rate=0.0)
    with whole_graph(
        tmp_path_factory.mktemp("cards"), source, ("2025-01-01", "2025-03-31")
    ) as built:
        yield built


def test_every_payment_is_a_decision_with_a_late_fraud_label(card_world):
    tables = card_world["tables"]
    payments = tables.scan("raw_events").filter(pl.col("event_type") == "payment").collect()
    decisions = tables.scan("decisions").collect()
    assert decisions.height == payments.height
    # The last two weeks' payments are not yet confirmed: unknown, not negative.
    recent = decisions.filter(pl.col("ts") >= pl.datetime(2025, 3, 18, time_zone="UTC"))
    assert recent["fraud"].null_count() == recent.height > 0


def test_the_model_is_judged_against_the_worlds_oracle(card_world):
    evaluation = card_world["tables"].scan("model_evaluation").collect()
    fraud = {
        r["model"]: r["auc"]
        for r in evaluation.filter(pl.col("task") == "fraud").iter_rows(named=True)
    }
    assert {"challenger", "baseline", "encoder_only", "oracle"} <= set(fraud)
    assert fraud["oracle"] >= fraud["challenger"] > 0.7


def test_a_payment_is_served_by_the_built_bento(card_world):
    checks = {c.check_name: c for c in card_world["result"].get_asset_check_evaluations()}
    assert checks["served_equals_offline"].passed, checks["served_equals_offline"].description
    answer, docs = served_request(card_world)
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["probabilities"]) == {"fraud"}
    schemas = docs["components"]["schemas"]
    fields = next(v for k, v in schemas.items() if k.startswith("ScoreRequest"))["properties"]
    assert fields["channel"]["anyOf"][0]["enum"] == ["card_present", "card_not_present"]
    assert "is_fraud" not in fields and "merchant_id" in fields
