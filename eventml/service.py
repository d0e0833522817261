"""The served risk model: a BentoML 1.4 service around the champion `RiskModel`.

`POST /score` scores one decision (an application): it reads the entity's history from the
online store, adds the `recent_events` the caller knows and the store has not seen yet
(deduplicated by event_id), and runs `RiskModel.score_one` — the same feature and sequence
functions as training. `POST /score_batch` scores many decisions per call (adaptive batching
merges concurrent calls). Built in: `/readyz`, `/livez`, `/metrics`, OpenAPI at `/docs.json`.

Bodies are `{"request": {...}}` for /score and `{"requests": [...]}` for /score_batch. Every
bad request is a 400 whose `detail[].loc` names the field; a non-JSON body is a 415.

Configuration (environment, read once per worker):
- `EVENTML_ONLINE_STORE`: the SQLite online store (required; `ml_assets.serving` publishes it).
- `EVENTML_PREDICTION_LOG`: the prediction-log folder (required).

Prediction log: every scored decision appends one JSON line under `$EVENTML_PREDICTION_LOG`
(format: `eventml.prediction_log`), which the `served_predictions` asset ingests.

No dagster or mlflow here: the Bento ships `eventml` and nothing of the orchestration.
"""

from __future__ import annotations

import gc
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import bentoml
import polars as pl
import torch
from bentoml.exceptions import BentoMLException
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from threadpoolctl import threadpool_limits

from eventml.features import compute_features
from eventml.online_store import SQLiteOnlineStore
from eventml.prediction_log import PredictionLog
from eventml.risk_model import RiskModel
from eventml.schema import TS_TYPE, DatasetSpec
from eventml.scorer import to_matrix

logger = logging.getLogger("bentoml.service.eventml")  # "bentoml.*" loggers reach the serve output

MODEL_NAME = "eventml-risk"  # the BentoML model store name (the MLflow registered model's)
SPEC_FILE = "dataset_spec.json"  # the event contract, saved next to the RiskModel bundle
MAX_RECENT_EVENTS = 64
MAX_BATCH = 256
# The feature set has all-history windows, so the whole history is read; this bounds one
# request's work (the simulated world's busiest entity has a few hundred events).
MAX_HISTORY = 20_000
MAX_AMOUNT = 10_000_000.0
ID = r"^[A-Za-z0-9_.:\-]+$"

# What the request models validate categories and event types against: the served model's own
# event contract, set once per worker when the model loads (field validators run per request,
# before adaptive batching, so one bad item never fails a merged batch).
_contract: dict = {}


def field_error(loc: tuple, kind: str, msg: str, value: object = None) -> ValidationError:
    """A 400 naming `loc` from inside a handler: BentoML answers a pydantic ValidationError raised
    there exactly like a request-parsing error."""
    return ValidationError.from_exception_data(
        "Input", [InitErrorDetails(type=PydanticCustomError(kind, msg), loc=loc, input=value)]
    )


def _check_category(column: str, value: str | None) -> str | None:
    allowed = _contract.get("categories", {}).get(column)
    if value is not None and allowed is not None and value not in allowed:
        raise ValueError(f"{column} {value!r} is not one of {list(allowed)}")
    return value


Name = Annotated[str, Field(min_length=1, max_length=64)]
Num = Annotated[float, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT, allow_inf_nan=False)]


class RecentEvent(BaseModel):
    """An event of the entity that the online store may not have yet (the event contract)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=64, pattern=ID)
    event_type: Name
    ts: AwareDatetime
    amount: Num | None = None
    channel: Name | None = None
    device_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=ID)
    merchant_category: Name | None = None
    policy_decision: Name | None = None
    profile_field: Name | None = None
    region: Name | None = None
    age_band: Name | None = None
    income_band: Name | None = None
    term_months: Num | None = None
    days_late: Num | None = None

    @field_validator("event_type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        types = _contract.get("event_types")
        if types is not None and v not in types:
            raise ValueError(f"event_type {v!r} is not one of {list(types)}")
        return v

    @field_validator(
        "channel",
        "merchant_category",
        "policy_decision",
        "profile_field",
        "region",
        "age_band",
        "income_band",
    )
    @classmethod
    def _known_category(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _check_category(info.field_name, v)


class ScoreRequest(BaseModel):
    """One decision: the entity, the application event itself, and optionally events the store
    has not seen yet (each strictly before the decision)."""

    model_config = ConfigDict(extra="forbid")

    entity_id: str = Field(min_length=1, max_length=64, pattern=ID)
    ts: AwareDatetime
    amount: float = Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    merchant_category: Name
    term_months: int | None = Field(default=None, ge=1, le=120)
    channel: Name
    device_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=ID)
    decision_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=ID)
    recent_events: list[RecentEvent] = Field(default_factory=list, max_length=MAX_RECENT_EVENTS)

    @field_validator("merchant_category", "channel")
    @classmethod
    def _known_category(cls, v: str, info: ValidationInfo) -> str:
        return _check_category(info.field_name, v)

    @field_validator("recent_events")
    @classmethod
    def _before_decision(cls, v: list[RecentEvent], info: ValidationInfo) -> list[RecentEvent]:
        ts = info.data.get("ts")  # absent when ts itself was invalid
        for i, event in enumerate(v):
            if ts is not None and event.ts >= ts:
                raise ValueError(f"recent_events[{i}].ts must be strictly before the decision ts")
        return v


def decision_of(request: ScoreRequest) -> dict:
    """The decision event's columns, as features and sequences read them."""
    return {
        "entity_id": request.entity_id,
        "ts": request.ts.astimezone(UTC),
        "amount": request.amount,
        "term_months": None if request.term_months is None else float(request.term_months),
        "merchant_category": request.merchant_category,
        "channel": request.channel,
        "device_id": request.device_id,
    }


class Reason(BaseModel):
    reason: str
    contribution: float


class ModelVersions(BaseModel):
    bento_model: str
    mlflow_version: str


class ScoreResponse(BaseModel):
    request_id: str
    entity_id: str
    decision_id: str | None
    probabilities: dict[str, float]
    decision: str
    reasons: dict[str, list[Reason]]
    model_versions: ModelVersions
    history_events: int


class BentoArgs(BaseModel):
    """Bento arguments: the build pins the exact model tag (`args={"model": tag}`); a floating
    `:latest` would resolve against the model store at serve time (docs/pitfall in NOTES)."""

    model: str = f"{MODEL_NAME}:latest"


ARGS = bentoml.use_arguments(BentoArgs)


@bentoml.service(
    name="eventml_risk",
    traffic={"timeout": 10, "max_concurrency": 64},
    workers=1,
    envs=[{"name": "EVENTML_ONLINE_STORE"}, {"name": "EVENTML_PREDICTION_LOG"}],
    labels={"owner": "eventml"},
)
class RiskService:
    # Declared at class level, so the build records it in the Bento and export packs it.
    model_ref = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        torch.set_num_threads(1)  # one request is one row: threads only add contention
        # NumPy's BLAS too: the reason-grouping matmul (256 x ~190 x ~170) takes ~7 ms with two
        # spinning threads and 0.04 ms with one (same bits), and the spin slows the next call.
        threadpool_limits(1, user_api="blas")
        ref = self.model_ref
        self.model = RiskModel.load(ref.path)
        for booster in self.model.scorer.boosters.values():
            booster.set_param({"nthread": 1})
        self.spec = DatasetSpec.model_validate_json(Path(ref.path_of(SPEC_FILE)).read_text())
        _contract.update(
            event_types=tuple(self.spec.event_types), categories=dict(self.spec.categories)
        )
        carried = set(RecentEvent.model_fields)
        if missing := set(self.spec.event_schema()) - carried - {"entity_id", *self.spec.oracle}:
            raise RuntimeError(f"the request model cannot carry event columns {sorted(missing)}")
        self.event_schema = self.spec.event_schema()
        self.decision_schema = {**self.event_schema, "ts": TS_TYPE}
        self.decision_type = self.spec.decision_event_types[0]
        self.store = SQLiteOnlineStore(os.environ["EVENTML_ONLINE_STORE"], self.spec, convert=False)
        self.log = PredictionLog(os.environ["EVENTML_PREDICTION_LOG"])
        self.versions = ModelVersions(
            bento_model=str(ref.tag),
            mlflow_version=str(ref.info.labels.get("mlflow_version", "unknown")),
        )
        self._ready = False
        logger.info(
            "loaded %s (mlflow v%s)", self.versions.bento_model, self.versions.mlflow_version
        )

    @bentoml.on_startup
    def _warm_up(self) -> None:
        self._score_one(example_request())
        self._score_many([example_request()] * 2)
        # Everything loaded so far (model, torch, bentoml, pydantic schemas: ~10^6 objects) lives
        # as long as the worker; frozen, the cyclic GC stops re-scanning it on every full
        # collection (each took ~0.15-0.3 s, landing on some unlucky request or batch).
        gc.collect()
        gc.freeze()
        self._ready = True

    def __is_ready__(self) -> bool:
        return self._ready

    # ------------------------------------------------------------ scoring

    def history(self, request: ScoreRequest) -> pl.DataFrame:
        """Stored events strictly before the decision, plus the request's recent events not
        already stored."""
        stored = self.store.history(request.entity_id, before=request.ts, limit=MAX_HISTORY)
        if not request.recent_events:
            return stored
        recent = pl.DataFrame(
            [{"entity_id": request.entity_id, **e.model_dump()} for e in request.recent_events],
            schema=self.event_schema,
        )
        return pl.concat([stored, recent]).unique("event_id", keep="first", maintain_order=True)

    def _response(self, r: ScoreRequest, scored: dict, history_events: int) -> ScoreResponse:
        return ScoreResponse(
            request_id=uuid.uuid4().hex,
            entity_id=r.entity_id,
            decision_id=r.decision_id,
            probabilities=scored["probabilities"],
            decision=scored["decision"],
            reasons={t: [Reason(**x) for x in rs] for t, rs in scored["reasons"].items()},
            model_versions=self.versions,
            history_events=history_events,
        )

    def _score_one(self, r: ScoreRequest) -> ScoreResponse:
        history = self.history(r)
        return self._response(r, self.model.score_one(history, decision_of(r)), history.height)

    def _score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Many decisions through the batch functions training uses (`compute_features`,
        `build_sequences`, one encoder pass, one scorer pass): the offline path itself. Each
        request's history gets its own key, so one request's recent events never reach another
        decision of the same entity."""
        model, keys = self.model, [str(i) for i in range(len(requests))]
        decisions = pl.DataFrame(
            [{**decision_of(r), "entity_id": k, "decision_id": k, "event_type": self.decision_type}
             for k, r in zip(keys, requests)],
            schema={**self.decision_schema, "decision_id": pl.String},
        )  # fmt: skip
        # Only events strictly before each request's own decision, as `history` reads for /score:
        # the store stops at the latest decision of each entity, and the join with each request's
        # key drops what is after that request's decision before its recent events are added.
        owner = pl.DataFrame(
            {"entity_id": [r.entity_id for r in requests], "key": keys, "__dts": decisions["ts"]}
        )
        stored = self.store.histories(
            [r.entity_id for r in requests], before=[r.ts for r in requests]
        )
        events = (
            stored.join(owner, on="entity_id")
            .filter(pl.col("ts") < pl.col("__dts"))
            .drop("entity_id", "__dts")
            .rename({"key": "entity_id"})
        )
        recent = [
            {**e.model_dump(), "entity_id": k}
            for k, r in zip(keys, requests)
            for e in r.recent_events
        ]
        events = events.select(list(self.event_schema))
        if recent:
            # Stored events never repeat within a key, so only recent ones can: the first of each
            # (key, event_id) counts, stored before recent — the rows a `unique` of all of them
            # keeps, without hashing every stored event.
            id_ = ["entity_id", "event_id"]
            fresh = (
                pl.DataFrame(recent, schema=self.event_schema)
                .unique(id_, keep="first", maintain_order=True)
                .join(events.select(id_), on=id_, how="anti", maintain_order="left")
            )
            events = pl.concat([events, fresh])
        n_prior = dict(events.group_by("entity_id").len().iter_rows())
        features = compute_features(events, decisions, model.feature_set)
        encoded = model.sequence_model.output_columns(
            model.sequence_model.arrays(events, decisions)
        )
        table = decisions.select("decision_id").join(
            features, on="decision_id", how="left", maintain_order="left"
        )
        table = table.with_columns(pl.Series(c, v) for c, v in encoded.items())
        scorer, reason_of = model.scorer, model.reason_of
        # One matrix for every booster's probabilities and SHAP values (`score_rows` gives what
        # `predict` and `contributions` give, to the bit).
        probs, contributions = scorer.score_rows(to_matrix(table, scorer.feature_names))
        reasons = {t: scorer.top_reasons(contributions[t], reason_of) for t in model.tasks}
        probs = {t: probs[t].tolist() for t in model.tasks}
        out = []
        for i, (r, k) in enumerate(zip(requests, keys)):
            p = {t: probs[t][i] for t in model.tasks}
            scored = {
                "probabilities": p,
                "decision": model.policy.decide(p),
                "reasons": {t: reasons[t][i] for t in model.tasks},
            }
            out.append(self._response(r, scored, n_prior.get(k, 0)))
        return out

    def _log(self, requests: list[ScoreRequest], out: list[ScoreResponse]) -> None:
        self.log.append(
            [
                {
                    "request_id": s.request_id,
                    "entity_id": s.entity_id,
                    "decision_ts": r.ts.astimezone(UTC).isoformat(),
                    "decision_id": s.decision_id,
                    "probabilities": s.probabilities,
                    "decision": s.decision,
                    "model_tag": self.versions.bento_model,
                    "mlflow_version": self.versions.mlflow_version,
                }
                for r, s in zip(requests, out)
            ]
        )

    @bentoml.api(route="/score")
    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one decision. Body: {"request": {...}}."""
        out = [self._score_one(request)]
        self._log([request], out)
        return out[0]

    @bentoml.api(
        route="/score_batch", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=5000
    )
    def score_batch(
        self, requests: Annotated[list[ScoreRequest], Field(max_length=MAX_BATCH)]
    ) -> list[ScoreResponse]:
        """Score many decisions. Body: {"requests": [...]}; answers in the same order."""
        out = self._score_many(requests) if requests else []
        self._log(requests, out)
        return out


def example_request() -> ScoreRequest:
    return ScoreRequest(
        entity_id="warmup", ts=datetime(2025, 6, 1, 12, tzinfo=UTC), amount=100.0,
        merchant_category=_contract.get("categories", {}).get("merchant_category", ("x",))[0],
        term_months=12, channel=_contract.get("categories", {}).get("channel", ("x",))[0],
    )  # fmt: skip


# ---------------------------------------------------------------- hardening


class JSONBodyOnly:
    """Pure-ASGI middleware: POSTs to the APIs must be JSON. BentoML otherwise dispatches on
    Content-Type to its multipart/form serdes, and a multipart type without a boundary is a 500
    (found by schemathesis). A missing Content-Type is JSON, as BentoML treats it."""

    def __init__(self, app, paths: tuple[str, ...] = ("/score", "/score_batch")) -> None:
        self.app, self.paths = app, frozenset(paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            ctype = dict(scope["headers"]).get(b"content-type", b"application/json")
            if ctype.split(b";")[0].strip().lower() != b"application/json":
                body = b'{"error":"Content-Type must be application/json"}'
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 415, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


RiskService.add_asgi_middleware(JSONBodyOnly)


class _QuietClientErrors(logging.Filter):
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


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
