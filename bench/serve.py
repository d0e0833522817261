"""Serving benchmark: the built Bento over HTTP against the bare in-process model.

    .venv/bin/python bench/serve.py                       # 5,000-user world, default + small encoder
    .venv/bin/python bench/serve.py --configs small --duration 10

For each encoder configuration: trains a risk model on a mid-size simulated world (cached under
`$EVENTML_HOME/bench/serve/`), reports its out-of-time AUC, publishes it into a BentoML store
and an online store there (a Bento is rebuilt whenever `eventml`'s code changes, so the figures
are always of the working tree), serves the Bento (1 worker) and measures
- single `/score` latency at a fixed arrival rate (open loop: each request is due at i/rate,
  and its latency counts from when it was due, so a stalled server is not hidden),
- `/score_batch` throughput with two concurrent callers,
- the bare in-process cost of the same decisions (`RiskModel.score_one`, and with the online
  store read the service adds), no HTTP.
With `--beside-training`, the open loop runs again while a training process (the encoder bench's
training step) shares the machine: on every core at the same priority, on every core at the
lowest priority, and pinned to one core (`BESIDE`; docs/serving.md says which to use).
Results print as a table and go to `<cache>/results.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import training_process  # noqa: E402
from eventml.embedding import SequenceModelConfig, embedding_table, train_sequence_model  # noqa: E402
from eventml.encoder import roc_auc  # noqa: E402
from eventml.features import compute_features  # noqa: E402
from eventml.home import StateHome  # noqa: E402
from eventml.labels import build_decisions  # noqa: E402
from eventml.risk_model import DecisionPolicy, RiskModel, model_table  # noqa: E402
from eventml.scorer import Scorer, ScorerConfig  # noqa: E402
from eventml.splits import split_decisions, with_person_folds  # noqa: E402
from eventml.threads import cores_given  # noqa: E402
from eventml.traffic import score_requests  # noqa: E402
from eventml.worlds.lending import PACK as LENDING_PACK  # noqa: E402
from eventml.worlds.lending import WorldConfig, simulate  # noqa: E402
from resources.bento import Serving  # noqa: E402

CONFIGS = {
    "default": SequenceModelConfig(),
    "small": SequenceModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=32),
}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def source_digest() -> str:
    """A short digest of the code a Bento packs (`eventml/**/*.py`, as `resources.bento` builds)."""
    digest = hashlib.blake2b(digest_size=6)
    for path in sorted((ROOT / "eventml").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def world(cache: Path, n_users: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Events, decisions with splits, and batch features of the world, cached as Parquet."""
    # "folded": splits with their people's folds (caches from before cross-fitting have none).
    files = [cache / f"{n}_{n_users}.parquet" for n in ("events", "folded_splits", "features")]
    if not all(f.exists() for f in files):
        cache.mkdir(parents=True, exist_ok=True)
        events = simulate(WorldConfig(n_users=n_users))
        splits = with_person_folds(
            split_decisions(build_decisions(events, LENDING_PACK), LENDING_PACK)
        )
        features = compute_features(events, splits, LENDING_PACK.feature_set())
        for frame, f in zip((events, splits, features), files):
            frame.write_parquet(f)
    return tuple(pl.read_parquet(f) for f in files)


def trained(cache: Path, name: str, events, splits, features) -> tuple[RiskModel, dict]:
    folder = cache / name
    current = (folder / "model" / "sequence_model" / "encoders").is_dir()  # cross-fitted
    if current and (folder / "quality.json").exists():
        return RiskModel.load(folder / "model"), json.loads((folder / "quality.json").read_text())
    config, t0 = CONFIGS[name], time.perf_counter()
    sequence_model, _ = train_sequence_model(
        events, splits, LENDING_PACK, config, log=lambda *_: None
    )
    train_s = time.perf_counter() - t0
    fs = LENDING_PACK.feature_set()
    outputs = embedding_table(sequence_model, events, splits)
    table = model_table(splits, features, outputs)
    tasks = [label.name for label in LENDING_PACK.labels]
    scorer = Scorer.fit(
        table.filter(pl.col("split") == "train"), table.filter(pl.col("split") == "valid"),
        fs.names + sequence_model.probability_names, tasks, ScorerConfig(), log=lambda *_: None,
    )  # fmt: skip
    model = RiskModel(sequence_model, scorer, fs, DecisionPolicy(LENDING_PACK.policy))
    test = table.filter(pl.col("split") == "test")
    probs = scorer.predict(test)
    quality = {
        "encoder": {k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads", "max_len")},
        "parameters": sequence_model.num_params(),
        "encoder_train_s": round(train_s, 1),
        **{
            f"test_auc_{t}": round(roc_auc(test[t].to_numpy()[m], probs[t][m]), 4)
            for t in tasks
            for m in [test[t].is_not_null().to_numpy()]
        },
    }
    model.save(folder / "model")
    (folder / "quality.json").write_text(json.dumps(quality, indent=2))
    return model, quality


def published(cache: Path, name: str, events: pl.DataFrame) -> tuple[Serving, str]:
    """The serving folder of a trained configuration (its online store written once) and the tag
    of a Bento of the working tree's `eventml` serving it."""
    serving = Serving.under(cache / name)
    if not Path(serving.online_store).exists():
        serving.store(LENDING_PACK).write(events)
    # A Bento serves the copy of `eventml` it was built with, so one is reused only while that
    # code is unchanged: otherwise the figures would be of an older service.
    label = f"bench-{name}-{source_digest()}"
    built = serving.bento_for(label) or serving.publish(
        cache / name / "model", LENDING_PACK.model_dump_json(), label
    )
    return serving, built.get("bento_tag") or built["tag"]


def bare(model: RiskModel, serving: Serving, requests: list[dict]) -> dict:
    """In-process cost of the same decisions: the model alone, and with the store read."""
    import torch

    from eventml.score_api import decision_of, request_models

    torch.set_num_threads(1)
    for b in model.scorer.boosters.values():
        b.set_param({"nthread": 1})
    store = serving.store(LENDING_PACK)
    score_request, _ = request_models(LENDING_PACK)
    parsed = [score_request.model_validate(r) for r in requests]
    histories = [store.history(r.entity_id, before=r.ts) for r in parsed]
    decisions = [decision_of(r) for r in parsed]
    for h, d in zip(histories[:20], decisions[:20]):
        model.score_one(h, d)
    model_ms, read_ms = [], []
    for r, h, d in zip(parsed, histories, decisions):
        t0 = time.perf_counter()
        store.history(r.entity_id, before=r.ts)
        t1 = time.perf_counter()
        model.score_one(h, d)
        t2 = time.perf_counter()
        read_ms.append((t1 - t0) * 1e3)
        model_ms.append((t2 - t1) * 1e3)
    both = [a + b for a, b in zip(model_ms, read_ms)]
    return {
        "score_one_p50_ms": pct(model_ms, 50), "score_one_p99_ms": pct(model_ms, 99),
        "store_read_p50_ms": pct(read_ms, 50), "read_and_score_p50_ms": pct(both, 50),
        "read_and_score_p99_ms": pct(both, 99),
    }  # fmt: skip


def parity(url: str, model: RiskModel, events, sample: pl.DataFrame, features) -> dict:
    """Largest |served - offline| probability over the sample, through /score and /score_batch
    (offline: `score_tables` on the batch features and the model's own embeddings)."""
    import httpx

    offline = model.score_tables(features, model.embed_decisions(events, sample))
    offline = {r["decision_id"]: r for r in offline.iter_rows(named=True)}
    requests = score_requests(sample, LENDING_PACK)
    with httpx.Client(base_url=url, timeout=120) as c:
        single = [c.post("/score", json={"request": r}).json() for r in requests[:100]]
        batch = c.post("/score_batch", json={"requests": requests[:256]}).json()

    def worst(served: list[dict]) -> float:
        return max(
            abs(p - offline[s["decision_id"]][f"p_{t}"])
            for s in served
            for t, p in s["probabilities"].items()
        )

    return {"single_decisions": len(single), "single_max_abs_diff": worst(single),
            "batch_decisions": len(batch), "batch_max_abs_diff": worst(batch)}  # fmt: skip


def open_loop(url: str, requests: list[dict], rate: float, duration: float) -> dict:
    import httpx

    n = int(rate * duration)
    late, service, codes = [], [], []
    lock = threading.Lock()
    client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64))
    start = time.perf_counter() + 0.5

    def fire(i: int) -> None:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter()
        r = client.post("/score", json={"request": requests[i % len(requests)]})
        done = time.perf_counter()
        with lock:
            late.append((done - due) * 1e3)
            service.append((done - sent) * 1e3)
            codes.append(r.status_code)

    with ThreadPoolExecutor(48) as pool:
        list(pool.map(fire, range(n)))
    elapsed = time.perf_counter() - start
    client.close()
    return {
        "requests": n, "achieved_rps": round(n / elapsed, 1), "non_200": sum(c != 200 for c in codes),
        "p50_ms": pct(late, 50), "p90_ms": pct(late, 90), "p99_ms": pct(late, 99), "max_ms": max(late),
        "service_p50_ms": pct(service, 50), "service_p99_ms": pct(service, 99),
    }  # fmt: skip


def _lowest_priority() -> None:
    # Niceness orders processes within one scheduling group; with autogroup (on by default),
    # each session is a group that gets an equal share, however nice its processes are. The
    # training gets a session of its own, and that group the lowest priority.
    os.setsid()
    Path("/proc/self/autogroup").write_text("19")


def _last_core() -> None:
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


# How a training step shares the machine with the server: every core at the same priority (no
# configuration), every core at the lowest priority, pinned to one core (its thread budget
# follows the one core it is given), or pinned to one core with the server on the others.
BESIDE = {
    "every_core": (cores_given(), None, False),
    "every_core_lowest_priority": (cores_given(), _lowest_priority, False),
    "one_core_pinned": (1, _last_core, False),
    "one_core_pinned_server_on_the_others": (1, _last_core, True),
}


def _pin_server(cores: set[int]) -> None:
    """The server's processes (this process's children: the bench starts it) onto `cores`."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.cpu_affinity(sorted(cores))


@contextmanager
def training_beside(how: str):
    """A training process (bench/encoder.py's step, until stopped) sharing the machine `how`."""
    threads, setup, pin_server = BESIDE[how]
    every = os.sched_getaffinity(0)
    if pin_server:
        _pin_server(every - {max(every)})
    try:
        with training_process(threads, preexec_fn=setup):
            yield
    finally:
        _pin_server(every)


def batch_throughput(
    url: str, requests: list[dict], size: int = 256, callers: int = 2, duration: float = 10.0
) -> dict:
    import httpx

    done, calls = [0], []
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def caller(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = k
            while time.perf_counter() < stop:
                body = [requests[(i * size + j) % len(requests)] for j in range(size)]
                t0 = time.perf_counter()
                r = c.post("/score_batch", json={"requests": body})
                r.raise_for_status()
                with lock:
                    done[0] += len(r.json())
                    calls.append((time.perf_counter() - t0) * 1e3)
                i += callers

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(caller, range(callers)))
    elapsed = time.perf_counter() - t0
    return {"batch_size": size, "callers": callers, "decisions_per_s": round(done[0] / elapsed, 1),
            "call_p50_ms": pct(calls, 50)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--configs", default="default,small")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--sample", type=int, default=400, help="test decisions sent (cycled)")
    ap.add_argument("--workers", default="1", help="comma-separated worker counts to serve with")
    ap.add_argument("--beside-training", action="store_true",
                    help="the open loop again with a training process beside (BESIDE)")  # fmt: skip
    args = ap.parse_args()
    cache = StateHome.from_env().root / "bench" / "serve"
    events, splits, features = world(cache, args.users)
    test = splits.filter(pl.col("split") == "test").sample(args.sample, seed=0)
    requests = score_requests(test, LENDING_PACK)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average_at_start": os.getloadavg()[0], "users": args.users, "events": events.height}  # fmt: skip
    for name in args.configs.split(","):
        model, quality = trained(cache, name, events, splits, features)
        serving, tag = published(cache, name, events)
        row = {"quality": quality, "bare": bare(model, serving, requests)}
        for workers in map(int, args.workers.split(",")):
            with serving.serve(tag, workers=workers, log_path=cache / name / "serve.log") as url:
                import httpx

                for r in requests[:50]:  # warm the connection and the worker
                    httpx.post(f"{url}/score", json={"request": r}, timeout=30)
                served = {"parity": parity(url, model, events, test, features)}
                served["score_open_loop"] = open_loop(url, requests, args.rate, args.duration)
                for how in BESIDE if args.beside_training else ():
                    with training_beside(how):
                        served[f"score_open_loop_beside_training_{how}"] = open_loop(
                            url, requests, args.rate, args.duration
                        )
                served["score_batch"] = batch_throughput(url, requests)
            p50 = served["score_open_loop"]["p50_ms"]
            bare_p50 = row["bare"]
            served["served_p50_over_score_one_p50"] = round(p50 / bare_p50["score_one_p50_ms"], 2)
            served["served_p50_over_read_and_score_p50"] = round(
                p50 / bare_p50["read_and_score_p50_ms"], 2
            )
            row[f"served_{workers}_workers"] = served
        results[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    (cache / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten {cache / 'results.json'}")


if __name__ == "__main__":
    main()
