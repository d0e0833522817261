"""`make serve`: serve the champion's Bento (built by `risk_service_bento`) on localhost.

    python -m ml_assets.serve [--port 3000] [--workers 2] [--tag eventml_risk:VERSION]

Reads the Bento store under `$EVENTML_HOME/bentoml`; the service reads the online store and
writes its prediction log under `$EVENTML_HOME` (`online/store.sqlite`, `predictions/`).
"""

from __future__ import annotations

import argparse
import os
import sys

from eventml.home import StateHome
from eventml.online_store import REDIS_SCHEMES
from resources.bento import SERVICE_NAME, Serving
from resources.state import mlflow_tracking, prepare


def champion_bento(serving: Serving, bentos: list[dict]) -> str:
    """The Bento of the MLflow champion (a retrain may have built newer ones for challengers
    that were later rolled back); the newest Bento when the registry has no champion."""
    from ml_assets.models import REGISTERED_MODEL

    champion = mlflow_tracking(StateHome.from_env()).version_by_alias(REGISTERED_MODEL, "champion")
    built = serving.bento_for(str(champion.version)) if champion else None
    return built["tag"] if built else bentos[0]["tag"]


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve the newest risk-model Bento.")
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--workers", type=int, default=2, help="2 keep up with 100 requests/s on 2 cores"
    )
    ap.add_argument("--tag", help="a Bento tag; default: the MLflow champion's")
    args = ap.parse_args()
    prepare()
    serving = Serving.configured(StateHome.from_env())
    bentos = serving.bentos()
    if not args.tag and not bentos:
        sys.exit(
            f"no Bento under {serving.home}: materialize `risk_service_bento` first (make demo)"
        )
    tag = args.tag or champion_bento(serving, bentos)
    version = next((b["labels"].get("mlflow_version") for b in bentos if b["tag"] == tag), "?")
    on_file = not serving.online_store.startswith(REDIS_SCHEMES)
    if on_file and not os.path.exists(serving.online_store):
        print(
            f"warning: no online store at {serving.online_store}: every entity has no history",
            file=sys.stderr,
        )
    print(f"serving {tag} (mlflow v{version}) on http://{args.host}:{args.port}", file=sys.stderr)
    env = serving.env(
        EVENTML_ONLINE_STORE=serving.online_store,
        EVENTML_PREDICTION_LOG=serving.prediction_log,
        BENTOML_CONFIG_OPTIONS=f"services.{SERVICE_NAME}.workers={args.workers}",
    )
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    os.execve(bentoml, [bentoml, "serve", tag, "--host", args.host, "--port", str(args.port)], env)


if __name__ == "__main__":
    main()
