"""The scoring API's request models, made from a dataset pack, in process: what a request may
say, that every rejection names its field, and that the contract's bounds are ingest's. (The
served Bento is tests/e2e/test_bento.py.)"""

import json
import logging
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from pydantic import ValidationError

from eventml.prediction_log import PredictionLog
from eventml.schema import DatasetSpec
from eventml.score_api import decision_of, request_models, ts_pattern
from eventml.serving_http import QuietClientErrors, corrected_openapi
from eventml.traffic import score_requests
from eventml.validation import validate
from eventml.worlds.lending import PACK as LENDING_PACK

ScoreRequest, RecentEvent = request_models(LENDING_PACK)
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
    assert set(decision_of(r)) == {"entity_id", "ts", "event_type", "amount",
                                   *LENDING_PACK.categorical, *LENDING_PACK.numeric}  # fmt: skip


def test_every_decision_event_type_can_be_scored_and_no_other():
    from eventml.pack import DatasetPack

    pack = DatasetPack.from_dict({
        "name": "bank", "source_start": "2025-01-01", "event_types": ["login", "transfer", "withdrawal"],
        "decision_event_types": ["transfer", "withdrawal"],
    })  # fmt: skip
    request, _ = request_models(pack)
    base = {"entity_id": "c1", "ts": TS}
    assert decision_of(request.model_validate(base))["event_type"] == "transfer"
    assert (
        decision_of(request.model_validate({**base, "event_type": "withdrawal"}))["event_type"]
        == "withdrawal"
    )
    with pytest.raises(ValidationError) as raised:
        request.model_validate({**base, "event_type": "login"})
    assert raised.value.errors()[0]["loc"] == ("event_type",)


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


def test_the_documented_ts_pattern_spans_the_source_start_to_the_month_after_now():
    pattern = re.compile(
        ts_pattern(datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC))
    )
    assert pattern.match("2025-01-01T00:00:00Z") and pattern.match("2026-11-30T23:59:59.5+01:00")
    assert pattern.match("2027-01-31T00:00:00Z")  # a month past the worker's start
    assert not pattern.match("2024-12-31T23:59:59Z") and not pattern.match("2027-02-01T00:00:00Z")
    assert not pattern.match("0001-01-01T00:00:00+03:00")


def test_a_missing_required_field_is_named():
    assert _locs({k: v for k, v in GOOD.items() if k != "ts"}) == ["ts"]


@pytest.mark.parametrize(
    "change,field",
    [
        ({"amount": -9_999_999.0}, "amount"),
        ({"amount": 2e9}, "amount"),
        ({"ts": "1900-01-01T00:00:00Z"}, "ts"),
        ({"event_id": "e" * 300}, "event_id"),
        ({"channel": "fax"}, "channel"),
        ({"device_id": "d" * 300}, "device_id"),
    ],
)
def test_recent_events_and_ingest_reject_the_same_rows(change, field):
    """One set of bounds: each of these events is a reject in ingest and a 400 naming the same
    field in a request."""
    event = _event(**change)
    raw = pl.DataFrame([{"entity_id": "u1", "amount": None, **event}])
    rejects = validate(raw, LENDING_PACK).rejects
    assert rejects["field"].to_list() == [field]
    assert f"recent_events.0.{field}" in _locs({**GOOD, "recent_events": [event]})


def test_an_event_may_not_lead_the_clock_though_a_decision_may_by_a_little():
    now = datetime.now(UTC)
    soon = (now + timedelta(minutes=2)).isoformat()
    assert ScoreRequest.model_validate({**GOOD, "ts": soon}).ts > now
    later = (now + timedelta(minutes=3)).isoformat()
    assert "recent_events.0.ts" in _locs({**GOOD, "ts": later, "recent_events": [_event(ts=soon)]})
    raw = pl.DataFrame([{"entity_id": "u1", "amount": None, **_event(ts=soon)}])
    assert validate(raw, LENDING_PACK, now=now).rejects["reason"].to_list() == ["ts_in_future"]


def test_what_ingest_keeps_a_request_accepts():
    """The other direction: clean rows, categoricals as ingest stores them (stripped; blank is
    missing), make valid requests."""
    raw = pl.DataFrame([{"entity_id": "u1", "amount": 5.0, "merchant_category": " travel ",
                         "device_id": "", **_event(event_type="application")}])  # fmt: skip
    clean = validate(raw, LENDING_PACK).clean
    assert clean["merchant_category"].to_list() == ["travel"] and clean["device_id"].to_list() == [
        None
    ]
    (body,) = score_requests(clean, LENDING_PACK)
    assert ScoreRequest.model_validate(body).merchant_category == "travel"


def test_a_pack_of_another_shape_gets_its_own_fields(bank_spec):
    spec = bank_spec.model_copy(update={"categories": {"channel": ("web", "branch")},
                                        "numeric": ("balance",)})  # fmt: skip
    request, event = request_models(DatasetSpec.model_validate(spec.model_dump()))
    assert set(request.model_fields) == {"entity_id", "ts", "event_type", "amount", "channel", "balance",
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


def test_a_label_column_is_never_a_request_field_a_feature_or_an_encoder_input():
    from eventml.pack import DatasetPack
    from eventml.sequences import SequenceSpec

    spec = DatasetPack.from_dict({
        "name": "cards", "source_start": "2025-01-01", "event_types": ["payment"],
        "numeric": ["is_fraud"], "decision_event_types": ["payment"],
        "labels": [{"name": "fraud", "kind": "column", "column": "is_fraud", "horizon_days": 30}],
        "policy": {"fraud": 0.5},
    })  # fmt: skip
    request, event = request_models(spec)
    assert "is_fraud" not in request.model_fields and "is_fraud" not in event.model_fields
    decisions = pl.DataFrame({"entity_id": ["c1"], "event_id": ["p1"], "amount": [3.0],
                              "ts": [datetime(2025, 2, 1, tzinfo=UTC)], "is_fraud": [1.0]})  # fmt: skip
    (body,) = score_requests(decisions, spec)
    assert request.model_validate(body).entity_id == "c1" and "is_fraud" not in body
    # Nor a decision feature, nor an encoder input.
    assert not any("is_fraud" in name for name in spec.feature_set().names)
    assert SequenceSpec.fit(spec).numeric == ()


def test_the_simulated_decisions_make_valid_requests():
    from eventml.worlds.lending import WorldConfig, simulate

    events = simulate(WorldConfig(n_users=60, n_days=60))
    decisions = events.filter(pl.col("event_type").is_in(LENDING_PACK.decision_event_types))
    bodies = score_requests(decisions, LENDING_PACK)
    assert len(bodies) == decisions.height > 0
    parsed = [ScoreRequest.model_validate(b) for b in bodies]
    assert [p.decision_id for p in parsed] == decisions["event_id"].to_list()


def test_the_openapi_document_lists_the_categories_and_describes_a_400():
    schema = ScoreRequest.model_json_schema()
    channel = schema["properties"]["channel"]["anyOf"][0]
    assert channel["enum"] == list(LENDING_PACK.categories["channel"])
    doc = {
        "components": {"schemas": {"InvalidArgument": {"properties": {"detail": {"type": "string"}}},
                                   "ScoreRequest": schema}},
        "paths": {p: {"post": {"responses": {}}} for p in ("/score", "/score_batch")},
    }  # fmt: skip
    fixed = corrected_openapi(doc)
    # The one decision event type: an enum OpenAPI 3.0 clients understand, not a `const`.
    event_type = fixed["components"]["schemas"]["ScoreRequest"]["properties"]["event_type"]
    assert event_type["enum"] == ["application"] and "const" not in event_type
    detail = fixed["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
    assert detail["type"] == "array" and detail["items"]["required"] == ["loc", "msg", "type"]
    assert {"415", "429", "503"} <= set(fixed["paths"]["/score"]["post"]["responses"])


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

    with pytest.raises(ValidationError) as bad_request:
        ScoreRequest.model_validate({**GOOD, "amount": -1})
    quiet = record(bad_request.value)
    QuietClientErrors().filter(quiet)
    assert quiet.levelno == logging.WARNING and quiet.exc_info is None
    loud = record(RuntimeError("boom"))
    QuietClientErrors().filter(loud)
    assert loud.levelno == logging.ERROR and loud.exc_info is not None


def test_what_the_service_imports_has_no_orchestration():
    """The Bento ships `eventml` alone: the service module (its imports read from its source,
    since importing it needs a served model) and every eventml module it imports load without
    dagster or mlflow."""
    import ast
    from pathlib import Path

    source = Path(__file__).parents[2] / "eventml" / "service.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {m.split(".")[0] for m in imported} & {"dagster", "mlflow", "ml_assets", "resources"}
    ours = sorted(m for m in imported if m.startswith("eventml."))
    code = f"import sys, {', '.join(ours)}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'dagster'" not in loaded and "'mlflow'" not in loaded


async def _call(middleware, path="/score", headers=(), app_status=200, in_app=None):
    """One request through `middleware` around an app answering `app_status`; what was sent."""
    sent = []

    async def app(scope, receive, send):
        if in_app:
            in_app()
        await send({"type": "http.response.start", "status": app_status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers),
             "client": ("127.0.0.1", 5000)}  # fmt: skip
    await middleware(app)(scope, None, send)
    return sent[0]["status"], dict(sent[0]["headers"])


def test_admission_refuses_past_the_limit_with_retry_after_and_closes_while_saturated():
    import asyncio

    from eventml.serving_http import Admission, AdmissionControl

    a = Admission(limit=1)
    full = lambda: asyncio.run(_call(lambda app: AdmissionControl(app, a)))  # noqa: E731
    status, headers = full()
    assert status == 200 and b"connection" not in headers and headers[b"x-eventml-worker"]
    a.in_flight = 1  # another call holds the only slot
    status, headers = full()
    assert status == 429 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert a.refused == 1 and a.saturated()
    a.in_flight = 0
    status, headers = full()  # served, but its connection closes while the worker is saturated
    assert status == 200 and headers[b"connection"] == b"close" and a.in_flight == 0


def test_a_body_that_is_not_only_json_is_a_415_however_the_header_is_repeated():
    import asyncio

    from eventml.serving_http import JSONBodyOnly

    json_type = (b"content-type", b"application/json")
    form_type = (b"content-type", b"multipart/form-data")
    assert asyncio.run(_call(JSONBodyOnly, headers=[json_type]))[0] == 200
    assert asyncio.run(_call(JSONBodyOnly, headers=[]))[0] == 200  # none: JSON, as BentoML reads it
    assert asyncio.run(_call(JSONBodyOnly, headers=[form_type, json_type]))[0] == 415
    assert asyncio.run(_call(JSONBodyOnly, headers=[json_type, form_type]))[0] == 415


def test_attribute_names_that_cannot_be_request_fields_are_refused_when_the_spec_loads():
    from eventml.schema import SpecError

    base = {"name": "x", "source_start": "2025-01-01", "event_types": ["a"],
            "decision_event_types": ["a"]}  # fmt: skip
    for bad in ("decision_id", "recent_events", "_src", "model_config", "two words"):
        with pytest.raises(SpecError, match="cannot be request fields"):
            DatasetSpec.from_dict({**base, "numeric": [bad]})
