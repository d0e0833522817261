"""The scoring API's request models, made from a dataset pack, in process: what a request may
say, that every rejection names its field, and that the contract's bounds are ingest's. (The
served Bento is tests/e2e/test_bento.py.)"""

import json
import logging
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from pydantic import ValidationError

from eventml.prediction_log import PredictionLog
from eventml.schema import DatasetSpec, validate
from eventml.score_api import decision_of, field_error, request_models, ts_pattern
from eventml.serving_http import QuietClientErrors, corrected_openapi
from eventml.simulate import LENDING_SPEC
from eventml.traffic import score_requests

ScoreRequest, RecentEvent = request_models(LENDING_SPEC)
TS = "2025-06-01T12:00:00+00:00"
GOOD = {
    "entity_id": "u0000001",
    "ts": TS,
    "amount": 120.5,
    "merchant_category": "travel",
    "term_months": 6,
    "channel": "app",
}


def _locs(body: dict, model=ScoreRequest) -> list[str]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return [".".join(map(str, err["loc"])) for err in e.value.errors()]


def _event(**change) -> dict:
    return {"event_id": "r1", "event_type": "session", "ts": "2025-05-01T00:00:00Z", **change}


def test_a_complete_request_and_a_minimal_one_are_valid():
    full = {**GOOD, "device_id": "d1", "decision_id": "e-1",
            "recent_events": [_event(event_type="payment_late", amount=20, days_late=3)]}  # fmt: skip
    assert ScoreRequest.model_validate(full).recent_events[0].days_late == 3
    minimal = ScoreRequest.model_validate({"entity_id": "u1", "ts": TS})
    assert minimal.amount is None and minimal.channel is None and minimal.recent_events == []


def test_the_decision_is_in_utc_whatever_offset_the_caller_used():
    r = ScoreRequest.model_validate({**GOOD, "ts": "2025-06-01T15:00:00+03:00"})
    assert decision_of(r)["ts"] == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert set(decision_of(r)) == {"entity_id", "ts", "amount", *LENDING_SPEC.categorical,
                                   *LENDING_SPEC.numeric}  # fmt: skip


@pytest.mark.parametrize(
    "change,field",
    [
        ({"merchant_category": "yachts"}, "merchant_category"),
        ({"channel": "fax"}, "channel"),
        ({"amount": float("nan")}, "amount"),
        ({"amount": -0.01}, "amount"),
        ({"amount": 1e10}, "amount"),  # past the contract's max_abs_value
        ({"term_months": -2e9}, "term_months"),
        ({"ts": "2025-06-01T12:00:00"}, "ts"),  # naive
        ({"ts": "0001-01-01T00:00:00+03:00"}, "ts"),  # no UTC instant
        ({"ts": "9999-12-31T23:59:59-01:00"}, "ts"),
        ({"ts": "2024-12-31T23:59:59Z"}, "ts"),  # before the source start
        ({"ts": "9845-01-01T00:00:00Z"}, "ts"),  # in the future
        ({"entity_id": "x" * 257}, "entity_id"),
        ({"entity_id": "   "}, "entity_id"),
        ({"device_id": "d" * 257}, "device_id"),
        ({"score_me_please": True}, "score_me_please"),
        ({"recent_events": [_event(event_type="warp")]}, "recent_events.0.event_type"),
        ({"recent_events": [_event(ts=TS)]}, "recent_events"),  # not strictly before
        ({"recent_events": [_event(ts="1900-01-01T00:00:00Z")]}, "recent_events.0.ts"),
        ({"recent_events": [_event(ts="0001-01-01T00:00:00+03:00")]}, "recent_events.0.ts"),
        ({"recent_events": [_event(amount=-9_999_999)]}, "recent_events.0.amount"),
        ({"recent_events": [_event(days_late=1e12)]}, "recent_events.0.days_late"),
        ({"recent_events": [_event(income_band="rich")]}, "recent_events.0.income_band"),
        ({"recent_events": [_event(true_p_default=1)]}, "recent_events.0.true_p_default"),
        ({"recent_events": [_event(event_id=f"r{i}") for i in range(65)]}, "recent_events"),
    ],
)
def test_each_invalid_field_is_named(change, field):
    assert field in _locs({**GOOD, **change})


def test_the_documented_ts_pattern_spans_the_source_start_to_the_last_whole_month():
    pattern = re.compile(
        ts_pattern(datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC))
    )
    assert pattern.match("2025-01-01T00:00:00Z") and pattern.match("2026-11-30T23:59:59.5+01:00")
    assert not pattern.match("2024-12-31T23:59:59Z") and not pattern.match("2026-12-01T00:00:00Z")
    assert not pattern.match("0001-01-01T00:00:00+03:00")


def test_a_missing_required_field_is_named():
    assert _locs({k: v for k, v in GOOD.items() if k != "ts"}) == ["ts"]


def test_recent_events_and_ingest_reject_the_same_rows():
    """One set of bounds: each of these events is a reject in ingest and a 400 in a request."""
    now = datetime.now(UTC)
    bad = [{"amount": -9_999_999.0}, {"amount": 2e9}, {"ts": "1900-01-01T00:00:00Z"},
           {"ts": (now + timedelta(days=1)).isoformat()}, {"event_id": "e" * 300}]  # fmt: skip
    for change in bad:
        event = _event(**change)
        raw = pl.DataFrame([{"entity_id": "u1", "amount": None, **event}])
        assert validate(raw, LENDING_SPEC, now=now).rejects.height == 1, change
        assert _locs({**GOOD, "ts": now.isoformat(), "recent_events": [event]}), change


def test_a_pack_of_another_shape_gets_its_own_fields(bank_spec):
    spec = bank_spec.model_copy(update={"categories": {"channel": ("web", "branch")},
                                        "numeric": ("balance",)})  # fmt: skip
    request, event = request_models(DatasetSpec.model_validate(spec.model_dump()))
    assert set(request.model_fields) == {"entity_id", "ts", "amount", "channel", "balance",
                                         "decision_id", "recent_events"}  # fmt: skip
    schema = request.model_json_schema()
    assert schema["$defs"]["RecentEvent"]["properties"]["event_type"]["enum"] == [
        "login",
        "transfer",
    ]
    assert "merchant_category" in _locs(
        {"entity_id": "c1", "ts": TS, "merchant_category": "x"}, request
    )
    assert "channel" in _locs({"entity_id": "c1", "ts": TS, "channel": "app"}, request)


def test_a_label_column_is_never_a_request_field():
    spec = DatasetSpec.from_dict({
        "name": "cards", "source_start": "2025-01-01", "event_types": ["payment"],
        "numeric": ["is_fraud"], "decision_event_types": ["payment"],
        "labels": [{"name": "fraud", "kind": "column", "column": "is_fraud", "horizon_days": 30}],
    })  # fmt: skip
    request, event = request_models(spec)
    assert "is_fraud" not in request.model_fields and "is_fraud" not in event.model_fields
    decisions = pl.DataFrame({"entity_id": ["c1"], "event_id": ["p1"], "amount": [3.0],
                              "ts": [datetime(2025, 2, 1, tzinfo=UTC)], "is_fraud": [1.0]})  # fmt: skip
    (body,) = score_requests(decisions, spec)
    assert request.model_validate(body).entity_id == "c1" and "is_fraud" not in body


def test_the_simulated_decisions_make_valid_requests():
    from eventml.simulate import WorldConfig, simulate

    events = simulate(WorldConfig(n_users=60, n_days=60))
    decisions = events.filter(pl.col("event_type").is_in(LENDING_SPEC.decision_event_types))
    bodies = score_requests(decisions, LENDING_SPEC)
    assert len(bodies) == decisions.height > 0
    parsed = [ScoreRequest.model_validate(b) for b in bodies]
    assert [p.decision_id for p in parsed] == decisions["event_id"].to_list()


def test_the_openapi_document_lists_the_categories_and_describes_a_400():
    schema = ScoreRequest.model_json_schema()
    channel = schema["properties"]["channel"]["anyOf"][0]
    assert channel["enum"] == list(LENDING_SPEC.categories["channel"])
    doc = {
        "components": {"schemas": {"InvalidArgument": {"properties": {"detail": {"type": "string"}}}}},
        "paths": {p: {"post": {"responses": {}}} for p in ("/score", "/score_batch")},
    }  # fmt: skip
    fixed = corrected_openapi(doc)
    detail = fixed["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
    assert detail["type"] == "array" and detail["items"]["required"] == ["loc", "msg", "type"]
    assert {"415", "429", "503"} <= set(fixed["paths"]["/score"]["post"]["responses"])


def test_field_error_is_a_validation_error_at_the_given_location():
    err = field_error(("request", "ts"), "ts_in_future", "ts is in the future", TS)
    assert err.errors()[0]["loc"] == ("request", "ts") and err.errors()[0]["type"] == "ts_in_future"


def test_the_prediction_log_appends_one_json_line_per_record(tmp_path):
    log = PredictionLog(tmp_path)
    log.append(
        [
            {"request_id": "a", "probabilities": {"t": 0.5}},
            {"request_id": "b", "probabilities": {"t": 0.1}},
        ]
    )
    log.append([{"request_id": "c", "probabilities": {"t": 0.2}}])
    (path,) = tmp_path.glob("*.jsonl")
    assert path.name == datetime.now(UTC).strftime("%Y-%m-%dT%H") + ".jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["a", "b", "c"] and all(
        "served_at" in x for x in lines
    )


def test_client_errors_are_logged_as_one_line_and_server_errors_keep_their_traceback():
    def record(exc):
        return logging.LogRecord(
            "bentoml._internal.server.http_app", logging.ERROR, __file__, 1, "bad", (),
            (type(exc), exc, None),
        )  # fmt: skip

    quiet = record(field_error(("request", "amount"), "x", "negative"))
    QuietClientErrors().filter(quiet)
    assert quiet.levelno == logging.WARNING and quiet.exc_info is None
    loud = record(RuntimeError("boom"))
    QuietClientErrors().filter(loud)
    assert loud.levelno == logging.ERROR and loud.exc_info is not None


def test_what_the_service_imports_has_no_orchestration():
    code = ("import sys, eventml.score_api, eventml.serving_http, eventml.risk_model, "
            "eventml.online_store, eventml.prediction_log, eventml.features; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")  # fmt: skip
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'dagster'" not in loaded and "'mlflow'" not in loaded


def test_a_worker_that_turned_a_caller_away_is_saturated_for_its_cool_down():
    from eventml.serving_http import Admission

    a = Admission(limit=4, cool_down_s=0.2)
    assert not a.saturated()
    a.last_refusal = time.monotonic()
    assert a.saturated()
    time.sleep(0.25)
    assert not a.saturated()
