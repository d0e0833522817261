"""The scoring API's request models, generated from a dataset pack's event contract.

One set of bounds, the contract's (`DatasetSpec`): ingest rejects a row past them and these
models answer 400 for a request past them, so a served decision or a `recent_events` entry can
never hold what `raw_events` could not. Categorical columns with declared values and the event
types are enums, so the OpenAPI document lists them and a generated client (or schemathesis)
can send requests that reach the model. Every check runs while a request body is parsed, before
BentoML's adaptive batching merges it with other callers' requests: one bad item fails only its
own call.

Label columns and a simulator's oracle columns are not request fields: a decision is scored
before its label exists.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from eventml.schema import DatasetSpec

MODEL_NAME = "eventml-risk"  # the BentoML model store name (the MLflow registered model's)
SPEC_FILE = "dataset_pack.json"  # the dataset pack, saved next to the RiskModel bundle
MAX_RECENT_EVENTS = 64
MAX_BATCH = 256
# A decision happens "now" by the caller's clock, which may run a little ahead of the server's;
# events in a batch file arrive after they happened, so ingest allows no lead at all.
CLOCK_SKEW = timedelta(minutes=5)


def _time_check(spec: DatasetSpec, lead: timedelta):
    start = spec.source_start

    def in_contract_time(v: datetime) -> datetime:
        """The instant in UTC, inside [source_start, now + skew]. Converting first: an offset
        near year 1 or 9999 (`0001-01-01T00:00:00+03:00`) has no UTC instant at all."""
        try:
            utc = v.astimezone(UTC)
        except OverflowError:
            raise PydanticCustomError(
                "ts_out_of_range", "ts {ts} has no UTC instant", {"ts": v.isoformat()}
            ) from None
        if utc < start:
            raise PydanticCustomError(
                "ts_before_source_start",
                "ts {ts} is before the source start {start}",
                {"ts": utc.isoformat(), "start": start.isoformat()},
            )
        if utc > datetime.now(UTC) + lead:
            raise PydanticCustomError(
                "ts_in_future",
                "ts {ts} is in the future (more than {lead} s ahead of the server)",
                {"ts": utc.isoformat(), "lead": int(lead.total_seconds())},
            )
        return utc

    return in_contract_time


def ts_pattern(start: datetime, now: datetime) -> str:
    """An ISO 8601 instant with an offset, in a month from `start`'s to the one after `now`'s:
    what the OpenAPI document says of `ts` beside `format: date-time` (which has no bounds), so
    a client generated from it, or schemathesis, writes times the contract mostly accepts. It is
    made when a worker starts and reaches a month past it, so a gateway that enforces it still
    passes live decisions for a month of uptime. Documentation only: the validator decides,
    exactly (source start to now)."""
    end = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    months, (y, m) = [], (start.year, start.month)
    while (y, m) <= end:
        months.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return (
        rf"^({'|'.join(months)})-(0[1-9]|[12][0-9]|3[01])"
        r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])$"
    )


def _types(spec: DatasetSpec) -> dict[str, Any]:
    """Each kind of field, bounded by the contract."""
    start = spec.source_start.isoformat()
    pattern = ts_pattern(spec.source_start, datetime.now(UTC))

    def ts(lead: timedelta, what: str):
        return Annotated[
            AwareDatetime,
            AfterValidator(_time_check(spec, lead)),
            Field(
                description=f"{what}: ISO 8601 with an offset; from {start} to now",
                json_schema_extra={"pattern": pattern},
            ),
        ]

    return {
        "text": Annotated[
            str,
            # Blank is missing, as in ingest; `\S` says so in the OpenAPI document too.
            StringConstraints(
                strip_whitespace=True, min_length=1, max_length=spec.max_text_length, pattern=r"\S"
            ),
        ],
        "number": Annotated[
            float,
            Field(ge=-spec.max_abs_value, le=spec.max_abs_value, allow_inf_nan=False),
        ],
        "amount": Annotated[float, Field(ge=0, le=spec.max_abs_value, allow_inf_nan=False)],
        # The decision may lead the server's clock a little; an event that happened may not.
        "decision_ts": ts(CLOCK_SKEW, "the decision's time (up to 5 minutes ahead)"),
        "event_ts": ts(timedelta(0), "when the event happened"),
    }


def _attributes(spec: DatasetSpec, types: dict[str, Any]) -> dict[str, Any]:
    """The optional attribute fields of an event: categoricals (an enum where the pack declares
    the values) and numbers; never a label or oracle column, nor one a reference table supplies
    (the server attaches those)."""
    fields: dict[str, Any] = {}
    for column in spec.request_categorical:
        values = spec.categories.get(column)
        kind = Literal[tuple(values)] if values else types["text"]  # type: ignore[misc]
        fields[column] = (kind | None, None)
    for column in spec.request_numeric:
        fields[column] = (types["number"] | None, None)
    return fields


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def request_models(spec: DatasetSpec) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ScoreRequest, RecentEvent) for `spec`'s event contract.

    ScoreRequest: `entity_id`, `ts`, the decision's `event_type` (one of the pack's decision
    event types, the first by default) and the decision event's own attributes, an optional
    `decision_id`, and up to 64 `recent_events` the online store may not have yet (each strictly
    before the decision). RecentEvent: an event in the contract's shape, less `entity_id`."""
    types = _types(spec)
    attributes = _attributes(spec, types)
    event_type = Literal[tuple(spec.event_types)]  # type: ignore[misc]
    decision_type = Literal[tuple(spec.decision_event_types)]  # type: ignore[misc]
    recent_event = create_model(
        "RecentEvent",
        __base__=_Strict,
        __doc__="An event of the entity that the online store may not have yet.",
        event_id=(types["text"], ...),
        event_type=(event_type, ...),
        ts=(types["event_ts"], ...),
        amount=(types["amount"] | None, None),
        **attributes,
    )

    def before_decision(cls, v: list, info: ValidationInfo) -> list:
        ts = info.data.get("ts")  # absent when ts itself was invalid
        for i, event in enumerate(v):
            if ts is not None and event.ts >= ts:
                raise ValueError(f"recent_events[{i}].ts must be strictly before the decision ts")
        return v

    score_request = create_model(
        "ScoreRequest",
        __base__=_Strict,
        __doc__="One decision: the entity, the decision event itself, and optionally events "
        "the store has not seen yet (each strictly before the decision).",
        __validators__={"before_decision": field_validator("recent_events")(before_decision)},
        entity_id=(types["text"], ...),
        ts=(types["decision_ts"], ...),
        # Any of the pack's decision event types; the first when a caller does not say.
        event_type=(decision_type, spec.decision_event_types[0]),
        amount=(types["amount"] | None, None),
        **attributes,
        decision_id=(types["text"] | None, None),
        recent_events=(
            list[recent_event],  # type: ignore[valid-type]
            Field(default_factory=list, max_length=MAX_RECENT_EVENTS),
        ),
    )
    return score_request, recent_event


def decision_of(request: BaseModel) -> dict:
    """The decision event's columns, as features and sequences read them (ts already in UTC)."""
    return request.model_dump(exclude={"decision_id", "recent_events"})


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
