"""The whole graph on any pack, from ingest to a served request: what the worlds' and a user's
own end-to-end tests share."""

from contextlib import contextmanager

import dagster as dg
import polars as pl
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from ml_assets.serving import risk_service_bento
from resources.bento import Serving
from resources.compute import Compute
from resources.delta import DeltaTables
from resources.sources import EventSource
from resources.tracking import MlflowTracking

# 8 epochs: the small world's ~13 batches an epoch, one epoch ends inside the 100-step warmup, and
# so untrained, each fold's encoder gives every history nearly one value, a different one per
# fold: the risk scorer split on that person-fold marker and lost 0.19 out-of-time AUC.
WHOLE_GRAPH_OPS = {
    "sequence_encoder": {"config": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 16,
                                    "emb_dim": 8, "epochs": 8}},
    "baseline_scorer": {"config": {"n_estimators": 40, "learning_rate": 0.1, "max_depth": 3,
                                   "early_stopping_rounds": 20}},
    "risk_scorer": {"config": {"n_estimators": 40, "learning_rate": 0.1, "max_depth": 3,
                               "early_stopping_rounds": 20}},
    # A small world's calibration is noisy; the bound is the pack's in a real deployment.
    "champion": {"config": {"max_ece": 0.2}},
}  # fmt: skip


@contextmanager
def whole_graph(root, source: EventSource, days: tuple[str, str]):
    """Every asset from ingest to the built Bento, run the way a user would run them (the days
    in one run, then the rest), on private tables, models, MLflow and BentoML stores."""
    from ml_assets.evaluation import champion, model_evaluation
    from ml_assets.features import decision_features, decisions, training_splits
    from ml_assets.ingest import ingest, references
    from ml_assets.models import (
        baseline_scorer,
        decision_embeddings,
        decision_scores,
        risk_scorer,
        sequence_encoder,
    )
    from ml_assets.serving import online_store
    from resources.models import ModelIOManager

    tables = DeltaTables(root_uri=str(root / "tables"))
    serving = Serving.under(root)
    resources = {"tables": tables, "io_manager": tables.io_manager(),
                 "model_io_manager": ModelIOManager(root=str(root / "models")),
                 "mlflow_tracking": MlflowTracking.embedded(root / "mlflow"),
                 "event_source": source, "serving": serving, "compute": Compute()}  # fmt: skip
    assets = [references, ingest, decision_features, online_store, decisions, training_splits,
              sequence_encoder, decision_embeddings, baseline_scorer, risk_scorer, decision_scores,
              model_evaluation, champion, risk_service_bento]  # fmt: skip
    tags = {ASSET_PARTITION_RANGE_START_TAG: days[0], ASSET_PARTITION_RANGE_END_TAG: days[1]}
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize(assets, selection=["references"], resources=resources, instance=instance)
        daily = ["raw_events", "event_rejects", "decision_features", "online_store"]
        dg.materialize(assets, selection=daily, resources=resources, instance=instance, tags=tags)
        rest = [k for a in assets[4:] for k in a.keys_by_output_name.values()]
        trained = dg.materialize(assets, selection=rest, resources=resources, instance=instance,
                                 run_config={"ops": WHOLE_GRAPH_OPS})  # fmt: skip
        yield {"tables": tables, "serving": serving, "result": trained, "pack": source.spec()}


def served_request(built: dict) -> tuple:
    """One out-of-time decision sent to the built Bento's /score, and its /docs.json."""
    tag = built["result"].asset_materializations_for_node("risk_service_bento")[0]
    with built["serving"].serve(tag.metadata["bento_tag"].value) as url:
        return ask(url, built["tables"], built["pack"])


def ask(url: str, tables, pack) -> tuple:
    """The first test decision of `tables` sent to the Bento at `url`: its answer and
    /docs.json."""
    import httpx

    from eventml.traffic import score_requests

    splits = tables.scan("training_splits").collect()
    first_test = splits.filter(pl.col("split") == "test")["decision_id"][0]
    decision = tables.scan("raw_events").filter(pl.col("event_id") == first_test)
    (body,) = score_requests(decision.collect(), pack)
    answer = httpx.post(f"{url}/score", json={"request": body}, timeout=30)
    return answer, httpx.get(f"{url}/docs.json", timeout=30).json()
