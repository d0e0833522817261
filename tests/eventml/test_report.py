"""The out-of-time report judges every model on the same rows, next to the oracle; the promotion
audit records what was decided and why."""

import numpy as np
import polars as pl
import pytest
import returns_world
import yaml

from eventml.evaluate import metrics
from eventml.pack import DatasetPack
from eventml.promotion import PromotionRules, Verdict, audit_entry, metrics_of, within_bounds
from eventml.report import out_of_time_report, reference_sample

rng = np.random.default_rng(0)
N = 4_000
TRUTH = rng.uniform(0, 0.4, N)
PACK = DatasetPack.from_dict(
    {**yaml.safe_load(returns_world.PACK), "oracle": {"returned_14d": "p_returned"}}
)


def table() -> pl.DataFrame:
    y = (rng.uniform(size=N) < TRUTH).astype(np.int8)
    return pl.DataFrame({
        "decision_id": [f"d{i}" for i in range(N)], "ts": pl.datetime_range(
            pl.datetime(2025, 1, 1), pl.datetime(2025, 1, 1) + pl.duration(minutes=N - 1), "1m",
            eager=True),
        "returned_14d": pl.Series(y).set(pl.Series(np.arange(N) < 100), None),  # 100 pending
        "disputed": y, "n_order_all": rng.integers(0, 5, N), "p_returned": TRUTH,
    })  # fmt: skip


def test_every_model_is_judged_on_the_known_labels_beside_the_oracle():
    test = table()
    noisy = np.clip(TRUTH + rng.normal(0, 0.2, N), 0, 1)
    scores = {
        "challenger": {"returned_14d": TRUTH * 0.9, "disputed": TRUTH},
        "baseline": {"returned_14d": noisy, "disputed": noisy},
    }
    report = out_of_time_report(test, scores, PACK)
    assert set(report.table["model"]) == {"challenger", "baseline", "oracle"}
    assert report.table.filter(pl.col("task") == "returned_14d")["n"].to_list() == [N - 100] * 3
    # The challenger ranks as the truth does: no gap to the oracle, a lift over the baseline.
    assert report.oracle_gap()["returned_14d"] == pytest.approx(0.0, abs=1e-12)
    assert report.open_outcome_oracle["returned_14d"] == report.auc("oracle", "returned_14d")
    assert report.embedding_lift()["returned_14d"] > 0.05
    assert {"roc_returned_14d", "calibration_disputed", "scores_disputed"} <= set(report.plots)
    assert report.plots["roc_disputed"][:4] == b"\x89PNG"
    reference = reference_sample(test, scores["challenger"], ["n_order_all"])
    assert reference.columns == ["decision_id", "ts", "n_order_all", "p_returned_14d", "p_disputed"]


def test_the_realistic_ceiling_leaves_out_outcomes_drawn_before_the_decision():
    test = table()
    truth = TRUTH.copy()
    truth[:1000] = test["returned_14d"].to_numpy()[:1000].astype(float)  # already drawn: p 0 or 1
    test = test.with_columns(pl.Series("p_returned", truth))
    report = out_of_time_report(test, {"challenger": {"returned_14d": TRUTH}}, PACK)
    open_rows = test[1000:].filter(pl.col("returned_14d").is_not_null())
    expected = metrics(open_rows["returned_14d"].to_numpy(), open_rows["p_returned"].to_numpy())
    assert report.open_outcome_oracle["returned_14d"] == expected.auc
    assert report.auc("oracle", "returned_14d") > expected.auc  # the drawn ones rank perfectly


def test_the_audit_names_the_versions_the_reasons_and_the_run():
    evaluation = pl.DataFrame(
        {
            "model": ["challenger", "champion"],
            "task": ["t", "t"],
            "auc": [0.8, 0.7],
            "ece": [0.01, 0.2],
        }  # fmt: skip
    )
    challenger, champion = metrics_of(evaluation, "challenger"), metrics_of(evaluation, "champion")
    assert metrics_of(evaluation, "oracle") is None
    rules = PromotionRules(task="t", max_ece=0.05)
    assert within_bounds(challenger, rules) and not within_bounds(champion, rules)
    entry = audit_entry(Verdict(True, ["t AUC 0.8000 beats"]), "3", "2", challenger, champion, "r1")
    row = entry.row(0, named=True)
    assert (row["action"], row["champion_before"], row["champion_after"]) == ("promoted", "2", "3")
    assert row["dagster_run_id"] == "r1" and "0.8" in row["metrics"]
    refused = audit_entry(Verdict(False, ["worse"]), "4", "3", challenger, champion, "r2")
    assert refused.row(0, named=True)["champion_after"] == "3"
