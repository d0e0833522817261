"""The prediction log: what the service appends reads back as a table; a line that is not a
well-formed record is kept as a reject with its reason; every line is accounted for."""

import json
from datetime import UTC, date, datetime

import pytest

from eventml.prediction_log import PredictionLog, read_prediction_log

TASKS = ["default_90d", "fraud_60d"]


def record(i: int, day: int = 1, **overrides) -> dict:
    return {
        "request_id": f"r{i}", "entity_id": f"u{i}",
        "decision_ts": datetime(2025, 3, day, 12, tzinfo=UTC).isoformat(),
        "decision_id": f"d{i}", "probabilities": {"default_90d": 0.1, "fraud_60d": 0.01},
        "decision": "approve", "model_tag": "eventml-risk:abc", "mlflow_version": "3",
    } | overrides  # fmt: skip


def test_appended_records_read_back_with_one_column_per_task(tmp_path):
    PredictionLog(tmp_path).append([record(1), record(2, day=2)])
    predictions, rejects = read_prediction_log(tmp_path, TASKS)
    assert rejects.height == 0
    assert predictions["request_id"].to_list() == ["r1", "r2"]
    assert predictions["p_default_90d"].to_list() == [0.1, 0.1]
    assert predictions["decision_ts"].dt.date().to_list() == [date(2025, 3, 1), date(2025, 3, 2)]
    assert predictions["served_at"].null_count() == 0  # stamped by the writer


def test_days_are_chosen_by_decision_time_not_by_serving_time(tmp_path):
    PredictionLog(tmp_path).append([record(i, day=i) for i in range(1, 6)])
    predictions, _ = read_prediction_log(tmp_path, TASKS, date(2025, 3, 2), date(2025, 3, 4))
    assert predictions["request_id"].to_list() == ["r2", "r3"]


BAD = {
    "not json {": "unparseable_json",
    json.dumps([1, 2]): "not_an_object",
    json.dumps(record(9, request_id=None)): "missing_request_id",
    json.dumps(record(9, decision_ts="yesterday")): "unparseable_decision_ts",
    json.dumps(record(9, decision_ts="2025-03-01T12:00:00")): "unparseable_decision_ts",
    json.dumps(record(9, probabilities={"default_90d": 0.1})): "missing_p_fraud_60d",
    json.dumps(record(9, probabilities={"default_90d": 1.5, "fraud_60d": 0})): "p_default_90d_out_of_range",
    json.dumps(record(9, probabilities="high")): "unparseable_probabilities",
    json.dumps(record(9, entity_id=7)): "non_string_id",
}  # fmt: skip


@pytest.mark.parametrize("line, reason", BAD.items(), ids=list(BAD.values()))
def test_a_bad_line_is_rejected_with_its_reason_and_the_rest_still_read(tmp_path, line, reason):
    good = json.dumps({**record(1), "served_at": datetime.now(UTC).isoformat()})
    (tmp_path / "2026-01-01T00.jsonl").write_text(f"{good}\n{line}\n{good.replace('r1', 'r2')}\n")
    predictions, rejects = read_prediction_log(tmp_path, TASKS)
    assert predictions["request_id"].to_list() == ["r1", "r2"]
    assert rejects.select("line", "reason").rows() == [(2, reason)]
    assert rejects["raw"][0] == line


def test_a_request_logged_twice_keeps_its_first_line(tmp_path):
    log = PredictionLog(tmp_path)
    log.append([record(1)])
    log.append([record(1, decision="decline")])
    predictions, rejects = read_prediction_log(tmp_path, TASKS)
    assert predictions["decision"].to_list() == ["approve"]
    assert rejects["reason"].to_list() == ["duplicate_request_id"]


def test_no_log_yet_reads_as_empty_tables(tmp_path):
    predictions, rejects = read_prediction_log(tmp_path / "absent", TASKS)
    assert predictions.height == 0 and rejects.height == 0
    assert "p_fraud_60d" in predictions.columns
