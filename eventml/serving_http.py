"""The service's HTTP edge, as pure-ASGI middleware: what BentoML does not do for this service.

- `Admission`: a per-worker limit on scoring calls in flight, load shedding with 429s, and the
  state `/readyz` reports (a saturated worker is not ready).
- `JSONBodyOnly`: POSTs to the APIs must be JSON (415 otherwise).
- `OpenAPIDocument`: `/docs.json` as BentoML generates it, corrected to describe what the
  service answers (a 400's `detail` is a list of field errors; 415, 429 and 503 exist).
- `QuietClientErrors`: a 4xx is one log line, not a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from bentoml.exceptions import BentoMLException
from pydantic_core import ValidationError

API_PATHS = frozenset({"/score", "/score_batch"})
WORKER = str(os.getpid()).encode()


async def _answer(send, status: int, body: dict | bytes, headers: tuple = ()) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Admission:
    """This worker's scoring calls in flight, and when it last turned one away.

    At `limit` calls in flight the next caller gets a 429 at once (queueing it would only add
    latency behind a full worker), and for `cool_down_s` after that the worker is *saturated*:
    `/readyz` answers 503, so a load balancer sends new work elsewhere, and every response
    closes its connection, so keep-alive clients reconnect and the kernel spreads them over all
    the workers accepting on the socket (a restarted worker gets its share at once, instead of
    whenever the clients happen to reconnect). Every answer names its worker's pid in
    `x-eventml-worker`."""

    def __init__(self, limit: int, cool_down_s: float = 1.0) -> None:
        self.limit, self.cool_down_s = limit, cool_down_s
        self.in_flight, self.refused, self.last_refusal = 0, 0, -1e9

    def saturated(self) -> bool:
        return time.monotonic() - self.last_refusal < self.cool_down_s


class AdmissionControl:
    """Middleware applying an `Admission` to POSTs to the APIs."""

    def __init__(self, app, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_PATHS:
            return await self.app(scope, receive, send)
        a = self.admission
        if a.in_flight >= a.limit:
            a.refused += 1
            a.last_refusal = time.monotonic()
            return await _answer(
                send,
                429,
                {"error": f"this worker is at its limit of {a.limit} calls in flight; retry"},
                ((b"retry-after", b"1"), (b"connection", b"close")),
            )

        async def closing_send(message) -> None:
            if message["type"] == "http.response.start":
                # Which worker answered: what an operator correlates with a worker's log.
                headers = [*message.get("headers", ()), (b"x-eventml-worker", WORKER)]
                if a.saturated():
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        a.in_flight += 1
        try:
            await self.app(scope, receive, closing_send)
        finally:
            a.in_flight -= 1


class JSONBodyOnly:
    """POSTs to the APIs must be JSON. BentoML otherwise dispatches on Content-Type to its
    multipart/form serdes, and a multipart type without a boundary is a 500 (found by
    schemathesis). A missing Content-Type is JSON, as BentoML treats it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in API_PATHS:
            # Every Content-Type header, not one: BentoML reads the first, a dict keeps the last.
            types = [v for k, v in scope["headers"] if k.lower() == b"content-type"]
            if any(v.split(b";")[0].strip().lower() != b"application/json" for v in types):
                return await _answer(send, 415, {"error": "Content-Type must be application/json"})
        await self.app(scope, receive, send)


FIELD_ERROR = {
    "type": "object",
    "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
        "type": {"type": "string"},
    },
    "required": ["loc", "msg", "type"],
}
EXTRA_RESPONSES = {
    "415": "the body is not JSON",
    "429": "the worker is at its limit of calls in flight: retry (Retry-After)",
    "503": "the service is not ready",
}


def corrected_openapi(doc: dict) -> dict:
    """BentoML's document for this service, made true: a 400 (`InvalidArgument`) carries
    `detail`, a list of field errors with their `loc`, and the APIs also answer 415 and 429.
    A one-value field (`const`, which OpenAPI 3.0 does not have) becomes a one-value `enum`, so
    a 3.0 client or fuzzer sees the constraint (a pack with one decision event type)."""
    doc = _const_as_enum(json.loads(json.dumps(doc)))
    error = doc["components"]["schemas"]["InvalidArgument"]
    error["properties"]["detail"] = {"type": "array", "items": FIELD_ERROR}
    error_ref = {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}  # fmt: skip
    for path in API_PATHS:
        responses = doc["paths"][path]["post"]["responses"]
        for status, description in EXTRA_RESPONSES.items():
            responses[status] = {"description": description, **error_ref}
    return doc


def _const_as_enum(node):
    if isinstance(node, dict):
        node = {k: _const_as_enum(v) for k, v in node.items()}
        if "const" in node and not isinstance(node["const"], dict):  # not a property named const
            node["enum"] = [node.pop("const")]
        return node
    return [_const_as_enum(v) for v in node] if isinstance(node, list) else node


class OpenAPIDocument:
    """Answers GET /docs.json with `corrected_openapi` of BentoML's document."""

    def __init__(self, app, document: Callable[[], dict]) -> None:
        self.app, self.document, self._body = app, document, b""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/docs.json":
            if not self._body:
                self._body = json.dumps(corrected_openapi(self.document())).encode()
            return await _answer(send, 200, self._body)
        await self.app(scope, receive, send)


class QuietClientErrors(logging.Filter):
    """BentoML logs every 4xx at ERROR with a traceback; keep 5xx tracebacks, make client errors
    one WARNING line (a fuzzing run would otherwise write thousands of lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError) or (
            isinstance(exc, BentoMLException) and exc.error_code.value < 500
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.msg} -> {type(exc).__name__}: %s"
            record.args = (*(record.args or ()), str(exc).splitlines()[0][:200])
            record.exc_info = record.exc_text = None
        return True
