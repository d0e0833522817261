"""Request validation of the service, in process: what a request may say, and that every
rejection names its field. (Serving for real is tests/e2e.)"""

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from eventml import service
from eventml.prediction_log import PredictionLog
from eventml.service import ScoreRequest, _QuietClientErrors, field_error
from eventml.simulate import LENDING_SPEC

TS = "2025-06-01T12:00:00+00:00"
GOOD = {
    "entity_id": "u0000001",
    "ts": TS,
    "amount": 120.5,
    "merchant_category": "travel",
    "term_months": 6,
    "channel": "app",
}


@pytest.fixture(autouse=True)
def contract(monkeypatch):
    """What a worker sets from its model's event contract when it loads."""
    monkeypatch.setattr(
        service,
        "_contract",
        {"event_types": LENDING_SPEC.event_types, "categories": LENDING_SPEC.categories},
    )


def _locs(body: dict) -> list[str]:
    with pytest.raises(ValidationError) as e:
        ScoreRequest.model_validate(body)
    return [".".join(map(str, err["loc"])) for err in e.value.errors()]


def test_a_complete_request_and_a_minimal_one_are_valid():
    full = {**GOOD, "device_id": "d1", "decision_id": "e-1",
            "recent_events": [{"event_id": "r1", "event_type": "payment_late", "ts": "2025-05-31T00:00:00Z", "amount": 20, "days_late": 3}]}  # fmt: skip
    assert ScoreRequest.model_validate(full).recent_events[0].days_late == 3
    assert (
        ScoreRequest.model_validate(
            {k: v for k, v in GOOD.items() if k != "term_months"}
        ).term_months
        is None
    )


@pytest.mark.parametrize(
    "change,field",
    [
        ({"merchant_category": "yachts"}, "merchant_category"),
        ({"channel": "fax"}, "channel"),
        ({"amount": float("nan")}, "amount"),
        ({"amount": -0.01}, "amount"),
        ({"term_months": 121}, "term_months"),
        ({"ts": "2025-06-01T12:00:00"}, "ts"),
        ({"entity_id": "x" * 65}, "entity_id"),
        ({"entity_id": "no spaces"}, "entity_id"),
        ({"score_me_please": True}, "score_me_please"),
        (
            {
                "recent_events": [
                    {"event_id": "r1", "event_type": "warp", "ts": "2025-01-01T00:00:00Z"}
                ]
            },
            "recent_events.0.event_type",
        ),
        (
            {"recent_events": [{"event_id": "r1", "event_type": "session", "ts": TS}]},
            "recent_events",
        ),  # not strictly before
        (
            {
                "recent_events": [
                    {
                        "event_id": "r1",
                        "event_type": "session",
                        "ts": "2025-01-01T00:00:00Z",
                        "income_band": "rich",
                    }
                ]
            },
            "recent_events.0.income_band",
        ),
        (
            {
                "recent_events": [
                    {
                        "event_id": "r1",
                        "event_type": "session",
                        "ts": "2025-01-01T00:00:00Z",
                        "true_p_default": 1,
                    }
                ]
            },
            "recent_events.0.true_p_default",
        ),
        (
            {
                "recent_events": [
                    {"event_id": f"r{i}", "event_type": "session", "ts": "2025-01-01T00:00:00Z"}
                    for i in range(65)
                ]
            },
            "recent_events",
        ),
    ],
)
def test_each_invalid_field_is_named(change, field):
    assert field in _locs({**GOOD, **change})


def test_a_missing_required_field_is_named():
    assert _locs({k: v for k, v in GOOD.items() if k != "channel"}) == ["channel"]


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
            "bentoml._internal.server.http_app",
            logging.ERROR,
            __file__,
            1,
            "bad",
            (),
            (type(exc), exc, None),
        )

    quiet = record(field_error(("request", "amount"), "x", "negative"))
    _QuietClientErrors().filter(quiet)
    assert quiet.levelno == logging.WARNING and quiet.exc_info is None
    loud = record(RuntimeError("boom"))
    _QuietClientErrors().filter(loud)
    assert loud.levelno == logging.ERROR and loud.exc_info is not None


def test_the_service_module_imports_no_orchestration():
    code = "import sys, eventml.service; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'dagster'" not in loaded and "'mlflow'" not in loaded
