"""The built Bento, served for real: scores with reasons and versions, exactly the offline
scores, a 400 naming the field for every kind of bad input (and still serving after them, and
never failing another caller's batch), a prediction-log line per scored decision, an OpenAPI
document that lets schemathesis reach the model with no 5xx, load shedding that readiness
reports, and a worker killed under load replaced while every request is answered."""

import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import bentoml
import dagster as dg
import httpx
import polars as pl
import pytest
import schemathesis
from bentoml.exceptions import InvalidArgument
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from eventml.sources import DAY
from eventml.stream import EventStream, StreamConsumer
from eventml.traffic import score_requests
from ml_assets.serving import risk_service_bento
from resources.bento import Serving, worker_pids


@pytest.fixture(scope="module")
def requests_of(deployed):
    return lambda decisions: score_requests(decisions, deployed["spec"])


@pytest.fixture(scope="module")
def good(test_decisions, requests_of) -> dict:
    return requests_of(test_decisions.sort("ts").tail(1))[0]


# ------------------------------------------------------------------ the build


def test_the_bento_is_pinned_to_the_champion_and_passed_its_parity_check(deployed, bento_tag):
    result = deployed["result"]
    meta = result.asset_materializations_for_node("risk_service_bento")[0].metadata
    assert meta["mlflow_version"].value == deployed["version"] and meta["rebuilt"].value is True
    built = deployed["serving"].bento_for(deployed["version"])
    assert built["tag"] == bento_tag and built["model_tag"] == meta["model_tag"].value
    assert not built["model_tag"].endswith(":latest")
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "served_equals_offline" and check.passed, check.description
    assert check.metadata["decisions"].value == 50 and check.metadata["max_abs_diff"].value <= 1e-6


def test_a_second_run_reuses_the_bento_of_the_same_champion(deployed, bento_tag):
    again = dg.materialize(
        [risk_service_bento], resources=deployed["resources"], instance=deployed["instance"]
    )
    meta = again.asset_materializations_for_node("risk_service_bento")[0].metadata
    assert meta["bento_tag"].value == bento_tag and meta["rebuilt"].value is False
    assert all(c.passed for c in again.get_asset_check_evaluations())
    assert len(deployed["serving"].bentos()) == 1


def test_a_server_that_cannot_start_says_why_in_its_own_words(deployed, bento_tag):
    """Its workers fail on an online store that cannot exist: the error the caller gets (an
    asset's, through `Serving.serve`) is the server's own exception, not only a timeout."""
    unreachable = "/proc/eventml-no-such-folder/online.db"
    with pytest.raises(RuntimeError) as raised:
        with deployed["serving"].serve(bento_tag, online_store=unreachable):
            pass
    message = str(raised.value)
    assert "eventml-no-such-folder" in message and "Error" in message, message


# ------------------------------------------------------------------ scoring


def test_score_gives_probabilities_a_decision_reasons_and_versions(
    client, good, deployed, bento_tag
):
    out = client.score(request=good)
    model = deployed["model"]
    assert set(out["probabilities"]) == set(model.tasks)
    assert all(0.0 <= p <= 1.0 for p in out["probabilities"].values())
    assert out["decision"] == model.policy.decide(out["probabilities"])
    assert set(out["reasons"]) == set(model.tasks)
    for reasons in out["reasons"].values():
        assert len(reasons) <= 4 and all(r["contribution"] > 0 for r in reasons)
    assert out["model_versions"]["mlflow_version"] == deployed["version"]
    assert out["model_versions"]["bento_model"].startswith("eventml-risk:")
    assert out["decision_id"] == good["decision_id"] and len(out["request_id"]) == 32
    assert out["history_events"] > 0


def test_batch_scores_equal_the_offline_scores(client, deployed, test_decisions, requests_of):
    sample = test_decisions.sample(40, seed=1)
    model, tables = deployed["model"], deployed["tables"]
    ids = sample["decision_id"].implode()
    features = tables.scan("decision_features").filter(pl.col("decision_id").is_in(ids)).collect()
    events = (
        tables.scan("raw_events")
        .filter(pl.col("entity_id").is_in(sample["entity_id"].implode()))
        .drop("day")
        .collect()
    )
    offline = model.score_tables(features, model.embed_decisions(events, sample))
    served = client.score_batch(requests=requests_of(sample))
    assert [s["decision_id"] for s in served] == sample["decision_id"].to_list()  # answers in order
    got = pl.DataFrame(
        [
            {
                "decision_id": s["decision_id"],
                **{f"s_{t}": p for t, p in s["probabilities"].items()},
            }
            for s in served
        ]
    )
    both = offline.join(got, on="decision_id")
    assert both.height == 40
    for task in model.tasks:
        assert (both[f"p_{task}"] - both[f"s_{task}"]).abs().max() <= 1e-6


def test_recent_events_the_store_has_not_seen_count_once(client, good):
    base = client.score(request=good)["history_events"]
    ts = good["ts"]
    before = (datetime.fromisoformat(ts) - timedelta(minutes=5)).isoformat()
    new = {"event_id": "live-1", "event_type": "session", "ts": before, "channel": "app"}
    assert client.score(request={**good, "recent_events": [new]})["history_events"] == base + 1
    assert client.score(request={**good, "recent_events": [new, new]})["history_events"] == base + 1


def test_concurrent_batch_callers_each_get_their_own_answers(url, test_decisions, requests_of):
    bodies = [requests_of(test_decisions.slice(i * 3, 3)) for i in range(8)]

    def call(body):
        with bentoml.SyncHTTPClient(url, timeout=60) as c:
            return [s["decision_id"] for s in c.score_batch(requests=body)]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, bodies))
    assert answers == [[r["decision_id"] for r in b] for b in bodies]


def test_the_bento_serves_the_same_answers_from_the_redis_online_store(
    deployed, bento_tag, client, test_decisions, requests_of, redis_url, tmp_path
):
    """The production counterpart of the SQLite store: the same events published to Redis, the
    same Bento reading them gives every test decision the same scores and the same history;
    and an event published to the stream reaches `/score` once the consumer has taken it."""
    spec = deployed["spec"]
    events = deployed["tables"].scan("raw_events").drop(DAY).collect()
    redis_store = Serving.under(deployed["root"], online_store=redis_url).store(spec)
    redis_store.write(events)
    body = requests_of(test_decisions.head(64))
    from_sqlite = client.score_batch(requests=body)
    with deployed["serving"].serve(bento_tag, online_store=redis_url) as redis_served:
        with bentoml.SyncHTTPClient(redis_served, timeout=60) as on_redis:
            from_redis = on_redis.score_batch(requests=body)
            assert [(a["probabilities"], a["history_events"]) for a in from_redis] == [
                (a["probabilities"], a["history_events"]) for a in from_sqlite
            ]
            assert sum(a["history_events"] for a in from_redis) > 0

            request = body[0]
            seen = on_redis.score(request=request)["history_events"]
            stream = EventStream(redis_url, spec.name)
            consumer = StreamConsumer(
                stream, spec, redis_store, str(tmp_path / "events"), str(tmp_path / "rejects")
            )
            earlier = datetime.fromisoformat(request["ts"]) - timedelta(minutes=5)
            new = {"entity_id": request["entity_id"], "event_id": "streamed-1",
                   "ts": earlier.isoformat(), "event_type": "session", "channel": "app"}  # fmt: skip
            stream.publish([new])
            assert consumer.step(block_ms=1_000).clean == 1
            assert on_redis.score(request=request)["history_events"] == seen + 1


# ------------------------------------------------------------------ bad input

BAD = [
    ("entity_id", {"entity_id": ""}),
    ("entity_id", {"entity_id": "x" * 257}),
    ("amount", {"amount": -1}),
    ("amount", {"amount": "lots"}),
    ("amount", {"amount": 1e300}),
    ("merchant_category", {"merchant_category": "yachts"}),
    ("channel", {"channel": 7}),
    ("term_months", {"term_months": 1e10}),
    ("ts", {"ts": "0001-01-01T00:00:00+03:00"}),  # no UTC instant
    ("ts", {"ts": "9999-12-31T23:59:59-01:00"}),
    ("ts", {"ts": "9845-01-01T00:00:00Z"}),  # the future
    ("ts", {"ts": "2025-06-01T12:00:00"}),  # naive
    ("ts", {"ts": "yesterday"}),
    ("decision_id", {"decision_id": "x" * 257}),
    (
        "recent_events.0.amount",
        {
            "recent_events": [
                {
                    "event_id": "r1",
                    "event_type": "payment",
                    "ts": "2025-02-01T00:00:00Z",
                    "amount": -9_999_999,
                }
            ]
        },
    ),
    (
        "recent_events.0.ts",
        {
            "recent_events": [
                {"event_id": "r1", "event_type": "session", "ts": "1900-01-01T00:00:00Z"}
            ]
        },
    ),
    ("surprise", {"surprise": 1}),
    (
        "recent_events",
        {
            "recent_events": [
                {"event_id": "r1", "event_type": "session", "ts": "2999-01-01T00:00:00Z"}
            ]
        },
    ),
    (
        "recent_events",
        {
            "recent_events": [
                {"event_id": f"r{i}", "event_type": "session", "ts": "2025-02-01T00:00:00Z"}
                for i in range(65)
            ]
        },
    ),
    (
        "event_type",
        {
            "recent_events": [
                {"event_id": "r1", "event_type": "teleport", "ts": "2025-02-01T00:00:00Z"}
            ]
        },
    ),
    (
        "region",
        {
            "recent_events": [
                {
                    "event_id": "r1",
                    "event_type": "profile_change",
                    "ts": "2025-02-01T00:00:00Z",
                    "region": "mars",
                }
            ]
        },
    ),
    (
        "extra",
        {
            "recent_events": [
                {
                    "event_id": "r1",
                    "event_type": "session",
                    "ts": "2025-02-01T00:00:00Z",
                    "extra": 1,
                }
            ]
        },
    ),
]


@pytest.mark.parametrize("field,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_a_bad_request_is_a_400_naming_the_field(url, good, field, change):
    r = httpx.post(f"{url}/score", json={"request": {**good, **change}}, timeout=30)
    assert r.status_code == 400, r.text
    locs = [".".join(map(str, d["loc"])) for d in r.json()["detail"]]
    assert any(field in loc for loc in locs), locs


@pytest.mark.parametrize(
    "body,headers,status",
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b'{"entity_id": "u1"}', {"content-type": "application/json"}, 400),  # no "request" wrapper
        (b"[]", {"content-type": "application/json"}, 400),
        (b"a=1", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b"--x", {"content-type": "multipart/form-data"}, 415),
    ],
)
def test_malformed_bodies_are_client_errors(url, body, headers, status):
    assert (
        httpx.post(f"{url}/score", content=body, headers=headers, timeout=30).status_code == status
    )


def test_a_batch_with_one_bad_item_is_a_400_naming_its_index(client, good):
    with pytest.raises(InvalidArgument) as e:
        client.score_batch(requests=[good, {**good, "amount": -5}])
    detail = json.loads(str(e.value))["detail"]
    assert detail[0]["loc"] == ["requests", 1, "amount"]


def test_the_service_still_serves_after_bad_input_and_logs_every_scored_decision(
    url, client, good, deployed
):
    log_dir = deployed["serving"].prediction_log
    from pathlib import Path

    def lines():
        return [
            json.loads(x)
            for f in sorted(Path(log_dir).glob("*.jsonl"))
            for x in f.read_text().splitlines()
        ]

    before = len(lines())
    for _ in range(3):
        httpx.post(f"{url}/score", json={"request": {**good, "amount": -1}}, timeout=30)
    out = client.score(request=good)
    batch = client.score_batch(requests=[good, good])
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    logged = lines()
    assert len(logged) == before + 3  # the 400s were not scored, so not logged
    last = logged[-3]
    assert last["request_id"] == out["request_id"] and last["decision_id"] == good["decision_id"]
    assert last["probabilities"] == out["probabilities"] and last["decision"] == out["decision"]
    assert (
        last["mlflow_version"] == deployed["version"]
        and last["model_tag"] == out["model_versions"]["bento_model"]
    )
    assert {x["request_id"] for x in logged[-2:]} == {b["request_id"] for b in batch}
    assert set(last) == {"request_id", "entity_id", "decision_ts", "decision_id", "probabilities", "decision",
                         "model_tag", "mlflow_version", "served_at"}  # fmt: skip


def test_one_callers_unrepresentable_time_fails_only_its_own_call(url, test_decisions, requests_of):
    """Adaptive batching merges concurrent /score_batch calls into one model call: a bad item is
    refused while its own body is parsed, before it can join (and fail) a merged batch."""
    bodies = [requests_of(test_decisions.slice(i * 4, 4)) for i in range(13)]
    poison = [*bodies[0][:3], {**bodies[0][3], "ts": "0001-01-01T00:00:00+03:00"}]

    def call(body):
        return httpx.post(f"{url}/score_batch", json={"requests": body}, timeout=60)

    for _ in range(3):
        with ThreadPoolExecutor(13) as pool:
            got = list(pool.map(call, [poison, *bodies[1:]]))
        assert got[0].status_code == 400 and got[0].json()["detail"][0]["loc"] == [
            "requests",
            3,
            "ts",
        ]
        assert [r.status_code for r in got[1:]] == [200] * 12


# ------------------------------------------------------------------ the contract, fuzzed


@pytest.fixture(scope="module")
def served_openapi(url) -> dict:
    return httpx.get(f"{url}/docs.json", timeout=30).json()


def test_docs_json_describes_the_models_own_contract(served_openapi, deployed):
    spec, schemas = deployed["spec"], served_openapi["components"]["schemas"]
    assert {"/score", "/score_batch", "/readyz"} <= set(served_openapi["paths"])
    request = next(v for k, v in schemas.items() if k.startswith("ScoreRequest"))
    assert request["properties"]["channel"]["anyOf"][0]["enum"] == list(spec.categories["channel"])
    event = next(v for k, v in schemas.items() if k.startswith("RecentEvent"))
    assert event["properties"]["event_type"]["enum"] == list(spec.event_types)
    assert schemas["InvalidArgument"]["properties"]["detail"]["type"] == "array"
    assert {"200", "400", "415", "429"} <= set(
        served_openapi["paths"]["/score"]["post"]["responses"]
    )


# Per operation; `make fuzz` runs the full count (docs/reliability.md).
FUZZ_EXAMPLES = int(os.environ.get("EVENTML_FUZZ_EXAMPLES_HTTP", "150"))
FUZZ_CALLS: list[int] = []
FUZZ_REFUSALS: Counter = Counter()  # a 400's first field error: what the generator missed
_strategies: dict = {}


# One test per operation, each its own item: schemathesis' per-operation subtests of one item
# run only the first operation under pytest-xdist.
@pytest.mark.parametrize("path", ["/score", "/score_batch"])
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
@given(data=st.data())
def test_no_input_gets_a_server_error(path, url, served_openapi, data):
    if path not in _strategies:
        schema = schemathesis.openapi.from_dict(served_openapi)
        _strategies[path] = schema[path]["POST"].as_strategy()
    case = data.draw(_strategies[path])
    response = case.call(base_url=url, timeout=30)
    FUZZ_CALLS.append(response.status_code)
    if response.status_code == 400:
        first = response.json()["detail"][0]
        FUZZ_REFUSALS[f"{first['loc'][-1]}: {first['type']}"] += 1
    case.validate_response(response, checks=[not_a_server_error])


def test_the_fuzzing_reached_the_model_and_the_service_survived(url):
    assert len(FUZZ_CALLS) >= 2 * FUZZ_EXAMPLES - 20, len(FUZZ_CALLS)
    assert all(code < 500 for code in FUZZ_CALLS)
    scored = sum(code == 200 for code in FUZZ_CALLS)
    print(f"schemathesis: {len(FUZZ_CALLS)} calls, {scored} scored (200), "
          f"{sorted(set(FUZZ_CALLS))} statuses; 400s by first error: {FUZZ_REFUSALS.most_common(6)}")  # fmt: skip
    assert scored >= len(FUZZ_CALLS) / 2, (scored, len(FUZZ_CALLS))
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


# ------------------------------------------------------------------ overload and recovery


@pytest.fixture(scope="module")
def two_workers(deployed, bento_tag):
    """The same Bento on two workers that hold two calls each: a handful of callers fill it."""
    log = deployed["root"] / "serve-two-workers.log"
    with deployed["serving"].serve(bento_tag, workers=2, max_in_flight=2, log_path=log) as url:
        yield url


def _until(condition, timeout: float = 120.0) -> float:
    """Seconds until `condition()` holds (polled); fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=5).status_code == 200


def test_a_full_worker_sheds_load_and_says_it_is_not_ready(
    two_workers, test_decisions, requests_of
):
    body = {"requests": requests_of(test_decisions.head(200))}
    answers, probes, stop = [], [], threading.Event()

    def flood():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                answers.append(c.post(f"{two_workers}/score_batch", json=body))

    def probe():
        while not stop.is_set():
            probes.append(httpx.get(f"{two_workers}/readyz", timeout=10).status_code)

    threads = [threading.Thread(target=flood) for _ in range(10)] + [threading.Thread(target=probe)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    statuses = {r.status_code for r in answers}
    assert statuses == {200, 429}, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert 503 in probes  # a saturated worker is not ready ...
    _until(lambda: _ready(two_workers) and _ready(two_workers))  # ... and is again with room


def test_a_killed_worker_is_replaced_and_every_caller_is_answered(two_workers, good):
    """Keep-alive callers with the usual client behaviour (retry a 429 after Retry-After, retry
    on a dropped connection) keep getting scores while a worker is SIGKILLed and replaced."""
    old = worker_pids(two_workers)
    assert len(old) == 2
    served_by, stop = [], threading.Event()  # (when, status, worker pid) per answered call

    def caller():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = None
                for _ in range(100):
                    try:
                        r = c.post(f"{two_workers}/score", json={"request": good})
                    except httpx.TransportError:
                        r = None
                        continue  # the killed worker's connections
                    if r.status_code != 429:
                        break
                    time.sleep(0.1)
                if r is None:
                    served_by.append((time.monotonic(), "no answer", None))
                    continue
                served_by.append(
                    (time.monotonic(), r.status_code, r.headers.get("x-eventml-worker"))
                )

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    _until(lambda: len(served_by) > 20)
    killed = time.monotonic()
    os.kill(old[0], signal.SIGKILL)
    _until(lambda: len(set(worker_pids(two_workers)) - set(old)) == 1)
    (new,) = set(worker_pids(two_workers)) - set(old)
    _until(lambda: any(pid == str(new) for _, _, pid in served_by))
    stop.set()
    for t in threads:
        t.join()
    first = min(at for at, _, pid in served_by if pid == str(new))
    print(f"worker {old[0]} killed: its replacement {new} answered {first - killed:.1f} s later")
    assert {status for _, status, _ in served_by} == {200}
    assert not any(pid == str(old[0]) for at, _, pid in served_by if at > killed + 1)
    assert any(pid == str(old[1]) for at, _, pid in served_by if at > killed)  # the survivor served
    _until(lambda: _ready(two_workers))
