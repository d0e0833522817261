"""The prediction log: what the served model said, one JSON line per scored decision.

The service appends (`PredictionLog`); monitoring reads it back (`read_prediction_log`) into a
table, validated like events: a line that is not a well-formed record is kept as a reject with
its reason, never dropped.

Files: `<folder>/<YYYY-MM-DD>T<HH>.jsonl`, one per UTC hour of serving; each line is a single
O_APPEND write, so several workers can share a file. Fields: `request_id` (str, also returned to
the caller), `entity_id`, `decision_ts` (ISO 8601 UTC: when the decision happened, which is what
monitoring windows by), `decision_id` (str or null), `probabilities` ({task: float}), `decision`
("approve"/"decline"), `model_tag` (the BentoML model tag), `mlflow_version` (str), `served_at`
(ISO 8601 UTC: when it was scored).
"""

from __future__ import annotations

import json
import math
import os
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl

TS = pl.Datetime("us", "UTC")
REQUIRED = ("request_id", "entity_id", "decision_ts", "probabilities", "decision", "mlflow_version")


class PredictionLog:
    """Append-only JSON lines, one file per UTC hour (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._hour, self._fd = None, None

    def append(self, records: list[dict]) -> None:
        now = datetime.now(UTC)
        data = "".join(
            json.dumps({**r, "served_at": now.isoformat()}) + "\n" for r in records
        ).encode()
        with self._lock:
            hour = now.strftime("%Y-%m-%dT%H")
            if hour != self._hour:
                if self._fd is not None:
                    os.close(self._fd)
                self._fd = os.open(
                    self.folder / f"{hour}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                )
                self._hour = hour
            os.write(self._fd, data)


def log_schema(tasks: list[str]) -> dict[str, pl.DataType]:
    return {
        "request_id": pl.String, "entity_id": pl.String, "decision_ts": TS,
        "decision_id": pl.String, "decision": pl.String, "model_tag": pl.String,
        "mlflow_version": pl.String, "served_at": TS,
        **{f"p_{t}": pl.Float64 for t in tasks},
    }  # fmt: skip


REJECT_SCHEMA = {"file": pl.String, "line": pl.Int64, "reason": pl.String, "raw": pl.String}


def _ts(value) -> datetime:
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError("no time zone")
    return ts.astimezone(UTC)


def _parse(raw: str, tasks: list[str]) -> dict:
    """One line as a row of `log_schema`, or ValueError naming what is wrong."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("unparseable_json") from None
    if not isinstance(record, dict):
        raise ValueError("not_an_object")
    for name in REQUIRED:
        if record.get(name) in (None, ""):
            raise ValueError(f"missing_{name}")
    row = {c: record.get(c) for c in ("request_id", "entity_id", "decision_id", "decision",
                                       "model_tag", "mlflow_version")}  # fmt: skip
    if not all(isinstance(v, str | None) for v in row.values()):
        raise ValueError("non_string_id")
    for name in ("decision_ts", "served_at"):
        try:
            row[name] = _ts(record[name]) if record.get(name) is not None else None
        except (TypeError, ValueError):
            raise ValueError(f"unparseable_{name}") from None
    probabilities = record["probabilities"]
    if not isinstance(probabilities, dict):
        raise ValueError("unparseable_probabilities")
    for task in tasks:
        p = probabilities.get(task)
        if not isinstance(p, int | float) or isinstance(p, bool):
            raise ValueError(f"missing_p_{task}")
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"p_{task}_out_of_range")
        row[f"p_{task}"] = float(p)
    return row


def read_prediction_log(
    folder: str | Path, tasks: list[str], start: date | None = None, end: date | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(predictions, rejects) of every log file under `folder`, keeping decisions whose
    `decision_ts` falls on days [start, end) (either bound None: open). A request_id logged
    twice keeps its first line (the second is rejected as `duplicate_request_id`).

    Every file is read: files are named by serving hour, and a replayed or late decision can be
    logged long after it happened. Lines outside the window are neither kept nor rejected."""
    rows, rejects, seen = [], [], set()
    for path in sorted(Path(folder).glob("*.jsonl")) if Path(folder).exists() else []:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    row = _parse(raw, tasks)
                except ValueError as why:
                    rejects.append({"file": path.name, "line": number, "reason": str(why),
                                    "raw": raw.rstrip("\n")[:2000]})  # fmt: skip
                    continue
                day = row["decision_ts"].date()
                if (start and day < start) or (end and day >= end):
                    continue
                if row["request_id"] in seen:
                    rejects.append({"file": path.name, "line": number,
                                    "reason": "duplicate_request_id", "raw": raw.rstrip("\n")[:2000]})  # fmt: skip
                    continue
                seen.add(row["request_id"])
                rows.append(row)
    predictions = pl.DataFrame(rows, schema=log_schema(tasks)).sort("decision_ts", "request_id")
    return predictions, pl.DataFrame(rejects, schema=REJECT_SCHEMA)
