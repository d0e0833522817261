"""The served risk model: a BentoML 1.4 service around the champion `RiskModel`.

`POST /score` scores one decision (an application): it reads the entity's history from the
online store, adds the `recent_events` the caller knows and the store has not seen yet
(deduplicated by event_id), and runs `RiskModel.score_one` — the same feature and sequence
functions as training. `POST /score_batch` scores many decisions per call (adaptive batching
merges concurrent calls). Built in: `/readyz`, `/livez`, `/metrics`, OpenAPI at `/docs.json`.

Bodies are `{"request": {...}}` for /score and `{"requests": [...]}` for /score_batch. The
request models are made from the served model's own event contract (`eventml.score_api`), with
its bounds, categories and event types. Every bad request is a 400 whose `detail[].loc` names the
field; a non-JSON body is a 415; a worker at its limit of calls in flight answers 429, and for a
second after each 429 its `/readyz` answers 503 (`eventml.serving_http`).

Configuration (environment, read once per worker):
- `EVENTML_ONLINE_STORE`: the online store, a SQLite file or a redis:// URL (required;
  `ml_assets.serving` publishes it).
- `EVENTML_PREDICTION_LOG`: the prediction-log folder (required).
- `EVENTML_MAX_IN_FLIGHT`: scoring calls a worker holds at once (default 64).

Prediction log: every scored decision appends one JSON line under `$EVENTML_PREDICTION_LOG`
(format: `eventml.prediction_log`), which the `served_predictions` asset ingests.

No dagster or mlflow here: the Bento ships `eventml` and nothing of the orchestration.
"""

from __future__ import annotations

import gc
import logging
import os
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
import polars as pl
from pydantic import BaseModel, Field

from eventml.features import KEYED_KINDS
from eventml.online_store import open_store
from eventml.pack import DatasetPack
from eventml.prediction_log import PredictionLog
from eventml.references import attach
from eventml.schema import TS_TYPE
from eventml.score_api import (
    MAX_BATCH,
    MODEL_NAME,
    SPEC_FILE,
    ModelVersions,
    Reason,
    ScoreResponse,
    decision_of,
    request_models,
)
from eventml.serving_http import (
    Admission,
    AdmissionControl,
    JSONBodyOnly,
    OpenAPIDocument,
    QuietClientErrors,
)

logger = logging.getLogger("bentoml.service.eventml")  # "bentoml.*" loggers reach the serve output

# The feature set has all-history windows, so the whole history is read; this bounds one
# request's work (the simulated world's busiest entity has a few hundred events).
MAX_HISTORY = 20_000
# Scoring calls one worker holds at once; the next caller gets a 429 (see `Admission`).
MAX_IN_FLIGHT = int(os.environ.get("EVENTML_MAX_IN_FLIGHT", "64"))


class BentoArgs(BaseModel):
    """Bento arguments: the build pins the exact model tag (`args={"model": tag}`); a floating
    `:latest` would resolve against the model store at serve time (docs/pitfall in NOTES)."""

    model: str = f"{MODEL_NAME}:latest"


ARGS = bentoml.use_arguments(BentoArgs)
MODEL = bentoml.models.BentoModel(ARGS.model)


def served_pack(model: bentoml.models.BentoModel) -> DatasetPack:
    """The dataset pack saved with the served model: the request models are made from it when
    this module is imported (by `bentoml build` and by every worker), so the OpenAPI document
    lists the model's own columns, categories and event types."""
    stored = model.stored
    if stored is None:
        raise RuntimeError(
            f"no model {model.tag} in the BentoML store under {os.environ.get('BENTOML_HOME')}: "
            "serve a Bento built by the risk_service_bento asset (it imports the champion)"
        )
    return DatasetPack.model_validate_json(Path(stored.path_of(SPEC_FILE)).read_text())


SPEC = served_pack(MODEL)
ScoreRequest, RecentEvent = request_models(SPEC)


ADMISSION = Admission(MAX_IN_FLIGHT)


@bentoml.service(
    name="eventml_risk",
    # No BentoML concurrency limit: `Admission` is the one, per worker (BentoML's would divide a
    # service-wide figure by the workers and answer its 429s before any middleware sees them).
    traffic={"timeout": 10},
    workers=1,
    envs=[{"name": "EVENTML_ONLINE_STORE"}, {"name": "EVENTML_PREDICTION_LOG"}],
    labels={"owner": "eventml"},
)
class RiskService:
    # Declared at class level, so the build records it in the Bento and export packs it.
    model_ref = MODEL

    def __init__(self) -> None:
        # Imported here, in the worker: `bentoml serve`'s arbiter and `bentoml build` import this
        # module too and need neither torch nor xgboost (~2 s of every server start).
        import torch
        from threadpoolctl import threadpool_limits

        from eventml.risk_model import RiskModel

        # One request is one row: threads only add contention, so one thread for everything,
        # the feature kernels' parts too, whatever EVENTML_THREADS the server was started with.
        os.environ["EVENTML_THREADS"] = "1"
        torch.set_num_threads(1)
        # NumPy's BLAS too: the reason-grouping matmul (256 x ~190 x ~170) takes ~7 ms with two
        # spinning threads and 0.04 ms with one (same bits), and the spin slows the next call.
        threadpool_limits(1, user_api="blas")
        ref = self.model_ref
        self.model = RiskModel.load(ref.path)
        for booster in self.model.scorer.boosters.values():
            booster.set_param({"nthread": 1})
        self.spec = SPEC
        self.event_schema = self.spec.event_schema()
        self.decision_schema = {**self.event_schema, "ts": TS_TYPE}
        self.store = open_store(os.environ["EVENTML_ONLINE_STORE"], self.spec, convert=False)
        # Columns whose values key features of their own (a terminal, a merchant).
        self.key_columns = sorted({f.column for f in self.model.feature_set.of_kind(*KEYED_KINDS)})
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
        """Warmed up, and no caller turned away in the last second (`Admission`)."""
        return self._ready and not ADMISSION.saturated()

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
        recent = self.with_references(recent)
        return pl.concat([stored, recent]).unique("event_id", keep="first", maintain_order=True)

    def with_references(self, frame: pl.DataFrame) -> pl.DataFrame:
        """A request's decisions or recent events with the columns the pack's reference tables
        supply, as of each row's time: as ingest attached them to the stored events."""
        if not self.spec.references or frame.is_empty():
            return frame
        tables = {
            ref.name: self.store.references(ref.name, frame[ref.key].to_list())
            for ref in self.spec.references
        }
        return attach(frame, {k: v for k, v in tables.items() if v is not None}, self.spec)

    def activity(self, decisions: list[dict]) -> pl.DataFrame | None:
        """The stored daily activity of the decisions' keys (None: the model has no keyed
        features)."""
        if not self.key_columns:
            return None
        return self.store.activity({c: [d.get(c) for d in decisions] for c in self.key_columns})

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
        history, decision = self.history(r), decision_of(r)
        if self.spec.references:
            one = pl.DataFrame([decision], schema=self.decision_schema)
            decision = {**decision, **self.with_references(one).row(0, named=True)}
        scored = self.model.score_one(history, decision, self.activity([decision]))
        return self._response(r, scored, history.height)

    def _score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Many decisions through `RiskModel.score`, the batch functions training uses. Each
        request's history gets its own key, so one request's recent events never reach another
        decision of the same entity."""
        model, keys = self.model, [str(i) for i in range(len(requests))]
        # Keyed by request, each decision keeps its person's fold: the encoders that score them.
        folds = model.sequence_model.folds_of([r.entity_id for r in requests])
        decisions = self.with_references(
            pl.DataFrame([decision_of(r) for r in requests], schema=self.decision_schema)
        ).with_columns(
            pl.Series("entity_id", keys), pl.Series("decision_id", keys), pl.Series("fold", folds)
        )
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
            {**e.model_dump(), "entity_id": r.entity_id, "__key": k}
            for k, r in zip(keys, requests)
            for e in r.recent_events
        ]
        events = events.select(list(self.event_schema))
        if recent:
            # Stored events never repeat within a key, so only recent ones can: the first of each
            # (key, event_id) counts, stored before recent — the rows a `unique` of all of them
            # keeps, without hashing every stored event.
            id_ = ["entity_id", "event_id"]
            arrived = pl.DataFrame(recent, schema={**self.event_schema, "__key": pl.String})
            fresh = (
                self.with_references(arrived)
                .with_columns(pl.col("__key").alias("entity_id"))
                .drop("__key")
                .unique(id_, keep="first", maintain_order=True)
                .join(events.select(id_), on=id_, how="anti", maintain_order="left")
            )
            events = pl.concat([events, fresh])
        n_prior = dict(events.group_by("entity_id").len().iter_rows())
        scored = model.score(events, decisions, self.activity(decisions.to_dicts()))
        return [
            self._response(r, one, n_prior.get(k, 0)) for r, k, one in zip(requests, keys, scored)
        ]

    def _log(self, requests: list[ScoreRequest], out: list[ScoreResponse]) -> None:
        self.log.append(
            [
                {
                    "request_id": s.request_id,
                    "entity_id": s.entity_id,
                    "decision_ts": r.ts.isoformat(),  # in UTC since parsed
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
    """A decision of an entity the store has never seen: the warm-up's request."""
    return ScoreRequest(entity_id="warmup", ts=SPEC.source_start, amount=100.0)


# ---------------------------------------------------------------- hardening


RiskService.add_asgi_middleware(OpenAPIDocument, document=lambda: RiskService.openapi_spec.asdict())
RiskService.add_asgi_middleware(JSONBodyOnly)
RiskService.add_asgi_middleware(AdmissionControl, admission=ADMISSION)
logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietClientErrors())
