"""Live traffic from recorded decisions: the service's request body for each decision event, and
a replay of them against a running service (the time machine's production traffic, the parity
check's and the benchmark's requests).

The online store answers "events strictly before the decision", so replaying a day after its
events were stored gives each decision exactly the history it would have had live.
"""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from eventml.schema import ISO_UTC, DatasetSpec


def score_requests(decisions: pl.DataFrame, spec: DatasetSpec) -> list[dict]:
    """`POST /score` bodies (the `request` field) for decision events: `decision_id` (or
    `event_id`), `entity_id`, `ts`, `event_type`, `amount` and the decision's own attributes (the request
    fields `eventml.score_api` makes from `spec`)."""
    id_column = "decision_id" if "decision_id" in decisions.columns else "event_id"
    attributes = [*spec.request_categorical, *spec.request_numeric]
    rows = decisions.select(
        "entity_id", pl.col("ts").dt.to_string(ISO_UTC), "amount",
        *(["event_type"] if "event_type" in decisions.columns else []),
        *attributes, pl.col(id_column).alias("decision_id"),
    )  # fmt: skip
    return [{k: v for k, v in row.items() if v is not None} for row in rows.iter_rows(named=True)]


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def replay(
    url: str,
    decisions: pl.DataFrame,
    spec: DatasetSpec,
    batch_size: int = 128,
    timeout: float = 120,
) -> dict:
    """Send `decisions` (in time order) to the service at `url` through `/score_batch`; the
    service logs each one. Returns counts: sent, approved, declined."""
    import bentoml  # the client only; imported here so eventml's batch code does not need it

    requests = score_requests(decisions.sort("ts"), spec)
    approved = 0
    with bentoml.SyncHTTPClient(url, timeout=timeout) as client:
        for chunk in batches(requests, batch_size):
            answers = client.score_batch(requests=chunk)
            approved += sum(a["decision"] == "approve" for a in answers)
    return {"sent": len(requests), "approved": approved, "declined": len(requests) - approved}
