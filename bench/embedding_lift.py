"""Where the embedding lift goes: the out-of-time ROC AUC and PR AUC of features only vs
features + the encoders' cross-fitted probabilities (the shipped risk scorer), beside the
encoders alone (each person's other fold) and the world's oracle, on either built-in world, over encoder seeds and
partitions of the people into folds.

    .venv/bin/python bench/embedding_lift.py                  # lending, 3 seeds x 2 partitions
    .venv/bin/python bench/embedding_lift.py --world cards --users 1000 --days 150 \
        --option compromised_terminals_per_day=2 --option testing_rate=0.002 \
        --option takeover_rate=0.0015 --option shift_day=null --seeds 0 --partitions 0
    .venv/bin/python bench/embedding_lift.py --keep-tables DIR   # then, after a scorer change:
    .venv/bin/python bench/embedding_lift.py --from-tables DIR   # every run scored again

The world is simulated here (its `WorldConfig` defaults; by default the days before its shift)
and its features computed in process, so nothing needs `make demo` first.

The recipe is the shipped one, through the functions the assets call: people are dealt into two
folds (`eventml.splits.with_person_folds`), one encoder per fold learns decision labels from its
people's train rows only (`eventml.encoder_data.learning_rows`), and every decision of a person
takes the other fold's probabilities (`eventml.embedding.SequenceModel.output_columns`); both
scorers learn from every train row. Partition 0 is the shipped dealing; partition 1 deals
the same people another way (a salted hash): which people teach which encoder moved the lift
as much as the encoder's seed did, so one run is an anecdote; the summary gives every run's
lift, the mean and the spread. Then how much of the oracle's edge is outcomes the simulator had
already drawn, which no history can show. Studies of the recipes tried before this one (time
splits, halves of the people, no outlook, hashed ids): docs/embedding-lift.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import polars as pl
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from eventml.embedding import SequenceModelConfig, embedding_table, train_sequence_model
from eventml.labels import build_decisions
from eventml.pack import DatasetPack
from eventml.risk_model import model_table
from eventml.scorer import Scorer, ScorerConfig
from eventml.splits import split_decisions, with_person_folds
from eventml.worlds import WORLDS, world

METRICS = {"auc": roc_auc_score, "pr_auc": average_precision_score}


def load(name: str, users: int | None, days: int | None, options: dict):
    """A built-in world's events (its first `days` days: by default those before its shift),
    their decisions and their features, and its pack."""
    module = world(name)
    config = module.WorldConfig(**({"n_users": users} if users else {}), **options)
    days = days or config.shift_day or config.n_days
    if days > config.n_days:
        config = dataclasses.replace(config, n_days=days)
    events = module.simulate(config, range(days))
    pack = module.PACK
    decisions = build_decisions(events, pack)
    features = pack.compute_features(events, decisions)
    return events, decisions, features, pack


def judged(test: pl.DataFrame, task: str) -> tuple:
    """The matured, applicable test rows of `task`: a mask and their labels."""
    known = (test[f"{task}_matured"] & test[task].is_not_null()).to_numpy()
    return known, test[task].to_numpy()[known].astype(int)


def out_of_time(
    table: pl.DataFrame, columns: list[str], pack: DatasetPack
) -> dict[str, dict[str, float]]:
    """Out-of-time ROC AUC and PR AUC per task of a scorer on `columns`, fitted as the shipped
    scorers are: on every train row, early-stopped on valid, scored on matured test rows."""
    tasks = [label.name for label in pack.labels]
    train, valid, test = (table.filter(pl.col("split") == s) for s in ("train", "valid", "test"))
    config = ScorerConfig(monotone=pack.monotone)
    scorer = Scorer.fit(train, valid, columns, tasks, config, log=lambda line: None)
    predicted = scorer.predict(test)
    out = {}
    for task in tasks:
        known, y = judged(test, task)
        out[task] = {m: f(y, predicted[task][known]) for m, f in METRICS.items()}
    return out


def run(seed, partition, events, splits, features, pack, args) -> tuple[dict, pl.DataFrame]:
    folded = with_person_folds(splits, salt="" if partition == 0 else f"partition {partition}")
    config = SequenceModelConfig(epochs=args.epochs, seed=seed, patience=args.patience)
    start = time.perf_counter()
    quiet = lambda line: print(line, flush=True) if line.startswith("fold") else None  # noqa: E731
    model, results = train_sequence_model(events, folded, pack, config, log=quiet)
    seconds = time.perf_counter() - start
    table = model_table(folded, features, embedding_table(model, events, folded))
    row = {
        "seed": seed,
        "partition": partition,
        "encoders_s": round(seconds),
        "best_epochs": "/".join(str(r.best_epoch + 1) for r in results),
    }
    return row | lift(table, pack), table


def lift(table: pl.DataFrame, pack: DatasetPack) -> dict:
    """The figures of one run's model table: features only, + the encoders' probabilities
    (`encoder_<task>`), the encoders alone and the oracle, per task and metric."""
    tasks = [label.name for label in pack.labels]
    names = pack.feature_set().names
    encoders = [c for c in table.columns if c.startswith("encoder_")]
    baseline = out_of_time(table, names, pack)
    scorer = out_of_time(table, names + encoders, pack)
    test = table.filter(pl.col("split") == "test")
    row = {"scorer_rows": table.filter(pl.col("split") == "train").height}
    for task in tasks:
        known, y = judged(test, task)
        row[f"{task} test positives"] = int(y.sum())
        for metric, score in METRICS.items():
            figures = {
                "features": baseline[task][metric],
                "+encoders": scorer[task][metric],
                "encoders alone": score(y, test[f"encoder_{task}"].to_numpy()[known]),
                "oracle": score(y, test[pack.oracle[task]].to_numpy()[known]),
            }
            row |= {f"{task} {metric} {k}": round(v, 4) for k, v in figures.items()}
            row[f"{task} {metric} lift"] = round(figures["+encoders"] - figures["features"], 4)
    return row


def kept_runs(directory: str, pack: DatasetPack):
    """(row, table) of every table `--keep-tables` wrote to `directory`, scored again by the
    scorers as they are now: a scorer change measured over every run in minutes, without
    training an encoder."""
    paths = sorted(Path(directory).glob("p*-s*.parquet"))
    if not paths:
        raise SystemExit(
            f"no p<partition>-s<seed>.parquet in {directory}: write them with --keep-tables"
        )
    for path in paths:
        partition, seed = (int(part[1:]) for part in path.stem.split("-"))
        table = pl.read_parquet(path)
        print(f"{path}: scored again", flush=True)
        row = {"seed": seed, "partition": partition, "encoders_s": None, "best_epochs": None}
        yield row | lift(table, pack), table


def oracle_edge(table: pl.DataFrame, pack: DatasetPack, task: str) -> dict:
    """Test positives the simulator had already drawn (oracle p = 1), which no history can
    show, and the oracle's AUC without them."""
    oracle = pack.oracle[task]
    test = table.filter(
        (pl.col("split") == "test") & pl.col(f"{task}_matured") & pl.col(task).is_not_null()
    )
    rest = test.filter(pl.col(oracle) < 0.999)
    return {
        "test positives": int(test[task].sum()),
        "already drawn (oracle p = 1)": int(test.filter(pl.col(oracle) >= 0.999)[task].sum()),
        "oracle AUC without them": round(roc_auc_score(rest[task], rest[oracle]), 4),
    }


def runs(args):
    """(row, model table) of every run the arguments ask for."""
    if args.from_tables:
        yield from kept_runs(args.from_tables, world(args.world).PACK)
        return
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    events, decisions, features, pack = load(args.world, args.users, args.days, options)
    splits = split_decisions(decisions, pack)
    days = events["ts"].dt.date().n_unique()
    print(f"{args.world} {options}: {events.height:,} events, {decisions.height:,} decisions, "
          f"{days} days")  # fmt: skip
    for partition in args.partitions:
        for seed in args.seeds:
            row, table = run(seed, partition, events, splits, features, pack, args)
            if args.keep_tables:
                Path(args.keep_tables).mkdir(parents=True, exist_ok=True)
                table.write_parquet(f"{args.keep_tables}/p{partition}-s{seed}.parquet")
            yield row, table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", choices=WORLDS, default="lending")
    p.add_argument("--users", type=int, help="default: the world's reference size")
    p.add_argument("--days", type=int, help="default: the days before the world's shift")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other WorldConfig field, e.g. testing_rate=0.002")  # fmt: skip
    p.add_argument("--epochs", type=int, default=SequenceModelConfig.epochs)
    p.add_argument("--patience", type=int, default=SequenceModelConfig.patience)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--partitions", type=int, nargs="+", default=[0, 1],
                   help="0: the shipped folds of the people; n > 0: another dealing of them")  # fmt: skip
    p.add_argument("--keep-tables", metavar="DIR",
                   help="write each run's model table (features, the encoders' outputs, "
                        "splits) to DIR/p<partition>-s<seed>.parquet")  # fmt: skip
    p.add_argument("--from-tables", metavar="DIR",
                   help="train no encoder: score the tables --keep-tables wrote to DIR again, "
                        "with the scorers as they are now")  # fmt: skip
    args = p.parse_args(argv)
    rows, first = [], None
    for row, table in runs(args):
        first = table if first is None else first
        print(row, flush=True)
        rows.append(row)
    pack = world(args.world).PACK
    tasks = [label.name for label in pack.labels]
    results = pl.DataFrame(rows)
    figures = [c for c in results.columns if c.split(" ")[0] in tasks]
    lifts = [c for c in figures if c.endswith(" lift")]
    summary = results.select(
        pl.len().alias("runs"),
        *(pl.col(c).mean().round(4) for c in figures),
        *(pl.col(c).std().round(4).alias(f"{c} sd") for c in lifts),
        *(pl.col(c).min().alias(f"{c} min") for c in lifts),
        *(pl.col(c).max().alias(f"{c} max") for c in lifts),
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print("\nthe lift of every run (partitions x seeds)")
        print(results.select("partition", "seed", "encoders_s", "best_epochs", *lifts))
        print("\nmean over runs")
        print(summary.transpose(include_header=True))
    task = pack.promotion_rules.task
    print(f"\nthe oracle's edge on {task}:", oracle_edge(first, pack, task))


if __name__ == "__main__":
    main()
