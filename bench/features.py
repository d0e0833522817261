"""Benchmark: point-in-time features for a ~10M-event simulated world.

Prints events/s of `compute_features` (world generation and label building excluded) at the
step's thread budget and on one thread, beside the bare-Polars reference: one `rolling`
aggregation (a 30-day sum and count of one event type, at every event) over the same events,
the floor any feature pipeline on Polars pays. Then the ratio against a straightforward pandas
implementation of the same features (run on a sample of entities and scaled per input event,
after checking it agrees with the polars result on that sample), where the time goes per
feature family, the peak RSS while computing (the loaded events included; the simulator's own
peak is not), and — on the default world — the out-of-time AUC of a quick XGBoost fit on these
features next to the simulator's oracle AUC.

    .venv/bin/python bench/features.py                 # ~10M events (cached under $EVENTML_HOME/bench)
    .venv/bin/python bench/features.py --users 20000   # a smaller world
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from eventml.features import (
    FeatureSet,
    compute_features,
    encode_value,
    window_us,
)
from eventml.features.declare import US_PER_DAY
from eventml.home import StateHome
from eventml.labels import build_decisions
from eventml.splits import split_decisions, training_rows
from eventml.threads import step_threads
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, simulate

TASK = LENDING_PACK.promotion_rules.task  # the label promotion decides on


def world_path(config: WorldConfig) -> Path:
    # The simulator's source is part of the key: a changed world must not be read from cache.
    world = Path(simulate.__code__.co_filename).parent
    source = b"".join(p.read_bytes() for p in sorted(world.glob("*.py")))
    version = hashlib.sha256(source + (world / "pack.yaml").read_bytes()).hexdigest()[:10]
    name = f"events_u{config.n_users}_d{config.n_days}_s{config.seed}_{version}.parquet"
    return StateHome.from_env().root / "bench" / name


def world_events(config: WorldConfig) -> pl.DataFrame:
    path = world_path(config)
    if path.exists():
        return pl.read_parquet(path)
    t = time.perf_counter()
    events = simulate(config)
    print(f"simulated {events.height:,} events in {time.perf_counter() - t:.0f} s -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    events.write_parquet(path)
    return events


def reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) afresh: what came before (the simulator) is not
    the features' peak."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status")


def by_entity_and_time(events: pl.DataFrame) -> pl.DataFrame:
    return events.select("entity_id", "ts", "event_type", "amount").sort("entity_id", "ts")


def rolling_30d(events: pl.DataFrame, event_type: str) -> pl.DataFrame:
    """The bare-Polars floor: a 30-day sum and count of one event type's amounts before every
    event of every entity, one `rolling` over events sorted by (entity, time)."""
    of_type = pl.col("event_type") == event_type
    return (
        events.lazy()
        .rolling("ts", period="30d", closed="left", group_by="entity_id")
        .agg(pl.col("amount").filter(of_type).sum().alias("sum_30d"), of_type.sum().alias("n_30d"))
        .collect()
    )


def from_the_stored_table(events_path: Path, decisions: pl.DataFrame) -> tuple[float, float]:
    """`compute_features` as the asset runs it, on a scan of the stored events, in a fresh
    process (nothing else held, no allocator's leftovers): (seconds, peak RSS in GB)."""
    decisions_path = events_path.with_name(f"{events_path.stem}_decisions.parquet")
    decisions.write_parquet(decisions_path)
    probe = subprocess.run([sys.executable, __file__, "--scan-probe", str(events_path),
                            str(decisions_path)], capture_output=True, text=True, check=True)  # fmt: skip
    secs, gb = probe.stdout.split()[-2:]
    return float(secs), float(gb)


def scan_probe(events_path: str, decisions_path: str) -> None:
    decisions = pl.read_parquet(decisions_path)
    secs, _ = timed(
        lambda: compute_features(
            pl.scan_parquet(events_path), decisions, LENDING_PACK.feature_set()
        )
    )
    print(secs, peak_rss_gb())


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ------------------------------------------------------------------ the pandas reference


def _matching(h: pd.DataFrame, t: int, flt, window: str, until: int = 0) -> pd.Series:
    m = pd.Series(True, index=h.index)
    if flt is not None and flt.event_type is not None:
        m &= h["event_type"] == flt.event_type
    for col, value in flt.where if flt is not None else ():
        m &= h[col] == value
    m &= h["t"] < t - until
    w = window_us(window)
    return m if w is None else m & (h["t"] >= t - until - w)


def pandas_features(events: pd.DataFrame, decisions: pd.DataFrame, fs: FeatureSet) -> pd.DataFrame:
    """The obvious implementation: per decision, the entity's earlier events, one mask per feature."""
    events = events.assign(t=events["ts"].astype("int64")).sort_values(
        ["entity_id", "t", "event_id"]
    )
    by_entity = dict(tuple(events.groupby("entity_id", sort=False)))
    empty = events.iloc[:0]
    rows = []
    for d in decisions.to_dict("records"):
        t = int(pd.Timestamp(d["ts"]).value // 1000)
        h = by_entity.get(d["entity_id"], empty)
        h = h[h["t"] < t]
        row = {"decision_id": d["decision_id"]}

        for f in fs.features:
            if f.kind == "count":
                row[f.name] = int(_matching(h, t, f.events, f.window).sum())
            elif f.kind in ("sum", "mean", "max"):
                a = h.loc[_matching(h, t, f.events, f.window), f.column].dropna()
                stat = f.kind
                row[f.name] = (
                    float(a.sum())
                    if stat == "sum"
                    else (None if a.empty else float(getattr(a, stat)()))
                )
            elif f.kind == "distinct":
                row[f.name] = int(h.loc[_matching(h, t, None, f.window), f.column].nunique())
            elif f.kind == "days_since":
                ts = h.loc[_matching(h, t, f.events, "all"), "t"]
                row[f.name] = None if ts.empty else (t - int(ts.max())) / US_PER_DAY
            elif f.kind == "trend":
                w = window_us(f.window)
                row[f.name] = int(_matching(h, t, f.events, f.window).sum()) - int(
                    _matching(h, t, f.events, f.window, w).sum()
                )
            elif f.kind == "ratio":
                den = int(_matching(h, t, f.denominator, f.window).sum())
                row[f.name] = int(_matching(h, t, f.events, f.window).sum()) / den if den else None
            elif f.kind == "static":
                known = h[f.column].dropna()
                row[f.name] = (
                    encode_value(known.iloc[-1], fs.vocab[f.column]) if len(known) else None
                )
            elif f.kind == "decision_value":
                v = d[f.column]
                row[f.name] = None if v is None or pd.isna(v) else float(v)
            elif f.kind == "decision_category":
                v = d[f.column]
                row[f.name] = encode_value(None if pd.isna(v) else v, fs.vocab[f.column])
            elif f.kind == "seen_before":
                v = d[f.column]
                row[f.name] = None if v is None or pd.isna(v) else int((h[f.column] == v).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def mismatches(ref: pd.DataFrame, ours: pl.DataFrame, names: list[str]) -> int:
    ours_rows = {r["decision_id"]: r for r in ours.iter_rows(named=True)}
    bad = 0
    for r in ref.to_dict("records"):
        o = ours_rows[r["decision_id"]]
        for n in names:
            x, y = r[n], o[n]
            x = None if x is None or (isinstance(x, float) and np.isnan(x)) else x
            if (x is None) != (y is None) or (
                x is not None and abs(x - y) > 1e-9 * max(1.0, abs(x))
            ):
                bad += 1
    return bad


# ------------------------------------------------------------------ the run


def family_breakdown(events: pl.DataFrame, decisions: pl.DataFrame, fs: FeatureSet) -> None:
    """Seconds per feature family: the setup (encode, sort, window bounds) on its own, then each
    family on top of it."""
    setup, _ = timed(
        lambda: compute_features(
            events, decisions, FeatureSet(fs.of_kind("decision_value"), fs.event_types, fs.vocab)
        )
    )
    print(f"  setup (encode, sort, window bounds) + decision attributes: {setup:6.2f} s")
    families = {
        "counts, trends, ratios": ("count", "trend", "ratio"),
        "sum/mean/max of numeric columns": ("sum", "mean", "max"),
        "distinct values, same device": ("distinct", "seen_before"),
        "recency": ("days_since",),
        "static attributes": ("static",),
    }
    for name, kinds in families.items():
        sub = FeatureSet(tuple(fs.of_kind(*kinds)), fs.event_types, fs.vocab)
        secs, _ = timed(lambda sub=sub: compute_features(events, decisions, sub))
        print(f"  + {name:<32} {secs - setup:6.2f} s  ({len(sub.features)} features)")


def auc_vs_oracle() -> None:
    from sklearn.metrics import roc_auc_score
    from xgboost import XGBClassifier

    events = world_events(WorldConfig())
    decisions = build_decisions(events, LENDING_PACK)
    fs = LENDING_PACK.feature_set()
    table = split_decisions(decisions, LENDING_PACK).join(
        compute_features(events, decisions, fs), on="decision_id"
    )
    parts = {s: training_rows(table, TASK, s) for s in ("train", "valid", "test")}
    x = {s: p.select(fs.names).to_numpy() for s, p in parts.items()}
    y = {s: p[TASK].to_numpy() for s, p in parts.items()}
    model = XGBClassifier(n_estimators=400, max_depth=5, learning_rate=0.05, subsample=0.8,
                          colsample_bytree=0.5, early_stopping_rounds=30, n_jobs=2, eval_metric="auc")  # fmt: skip
    model.fit(x["train"], y["train"], eval_set=[(x["valid"], y["valid"])], verbose=False)
    auc = roc_auc_score(y["test"], model.predict_proba(x["test"])[:, 1])
    oracle = roc_auc_score(y["test"], parts["test"]["true_p_default"].to_numpy())
    rows = {s: len(v) for s, v in y.items()}
    print(
        f"default world ({events.height:,} events), {TASK} out-of-time, rows {rows}, test rate {y['test'].mean():.3f}"
    )
    print(
        f"  XGBoost on features: test AUC {auc:.4f}   oracle (true_p_default): {oracle:.4f}   chance: 0.5"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=int, default=85_000, help="simulated people (~118 events each)"
    )
    parser.add_argument(
        "--pandas-entities", type=int, default=60, help="entities in the pandas reference sample"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="timed runs of the polars path (best is reported)"
    )
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--scan-probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scan_probe:
        return scan_probe(*args.scan_probe)

    events = world_events(WorldConfig(n_users=args.users))
    decisions = build_decisions(events, LENDING_PACK)
    fs = LENDING_PACK.feature_set()
    print(
        f"world: {args.users:,} people, {events.height:,} events, {decisions.height:,} decisions, {len(fs.features)} features"
    )

    # The first call also loads (or, on a fresh checkout, compiles) the numba kernels; the best
    # of the repeats is the steady state. The machine is often shared: say how busy it was.
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    threads = step_threads()
    reset_peak_rss()
    inputs_gb = peak_rss_gb()
    secs, table = timed(lambda: compute_features(events, decisions, fs), args.repeat)
    rss_gb = peak_rss_gb()
    rate = events.height / secs
    print(f"ours, {threads} threads: {secs:.2f} s -> {rate / 1e6:.2f}M events/s "
          f"({decisions.height / secs / 1e3:.0f}k decisions/s)   [target >= 5M events/s]")  # fmt: skip
    print(f"peak RSS computing: {rss_gb:.2f} GB, of which {inputs_gb:.2f} GB held before "
          "(the events and decisions in memory)")  # fmt: skip
    scan_secs, scan_gb = from_the_stored_table(
        world_path(WorldConfig(n_users=args.users)), decisions
    )
    print(f"ours on a scan of the stored events, as the asset reads them, in a fresh process: "
          f"{scan_secs:.2f} s (the kernels' first load included), peak RSS {scan_gb:.2f} GB   "
          "[target <= 2.5 GB]")  # fmt: skip
    configured = os.environ.get("EVENTML_THREADS")
    os.environ["EVENTML_THREADS"] = "1"
    one, _ = timed(lambda: compute_features(events, decisions, fs), args.repeat)
    if configured is None:
        del os.environ["EVENTML_THREADS"]
    else:
        os.environ["EVENTML_THREADS"] = configured
    print(f"ours, the kernels on 1 thread (Polars' pool as before): {one:.2f} s -> "
          f"{events.height / one / 1e6:.2f}M events/s")  # fmt: skip
    of_type = fs.of_kind("sum")[0].events.event_type
    sort_secs, ordered = timed(lambda: by_entity_and_time(events), args.repeat)
    op_secs, _ = timed(lambda: rolling_30d(ordered, of_type), args.repeat)
    print(f"bare Polars reference, a 30-day sum + count of {of_type!r} at every event: the "
          f"rolling op {op_secs:.2f} s -> {events.height / op_secs / 1e6:.2f}M events/s on "
          f"events already in (entity, time) order, {sort_secs + op_secs:.2f} s with the sort; "
          f"ours / the op: {op_secs / secs:.2f}x   [moonshot: >= 0.5x]")  # fmt: skip

    rng = np.random.default_rng(0)
    entities = rng.choice(
        decisions["entity_id"].unique().sort().to_numpy(), args.pandas_entities, replace=False
    )
    sample_events = events.filter(pl.col("entity_id").is_in(entities.tolist()))
    sample_decisions = decisions.filter(pl.col("entity_id").is_in(entities.tolist()))
    ev_pd, dec_pd = sample_events.to_pandas(), sample_decisions.to_pandas()
    pd_secs, ref = timed(lambda: pandas_features(ev_pd, dec_pd, fs))
    pd_rate = sample_events.height / pd_secs
    bad = mismatches(
        ref,
        table.filter(pl.col("decision_id").is_in(sample_decisions["decision_id"].implode())),
        fs.names,
    )
    print(f"pandas reference on {args.pandas_entities} entities ({sample_events.height:,} events, "
          f"{sample_decisions.height:,} decisions): {pd_secs:.1f} s -> {pd_rate / 1e3:.1f}k events/s, "
          f"scaled per input event; mismatching values vs polars: {bad}")  # fmt: skip
    print(f"ratio polars / pandas: {rate / pd_rate:.0f}x   [target >= 10x]")

    print("where the polars time goes (one run each):")
    family_breakdown(events, decisions, fs)
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    if not args.skip_auc:
        auc_vs_oracle()


if __name__ == "__main__":
    main()
