"""Where the embedding lift goes: the out-of-time ROC AUC and PR AUC of features-only vs
features + embeddings, beside the world's oracle, on either built-in world, for the shipped
training recipe and the alternatives tried against it.

    .venv/bin/python bench/embedding_lift.py --world cards --users 1000 --days 150 \
        --option compromised_terminals_per_day=2 --option testing_rate=0.002 \
        --option takeover_rate=0.0015 --option shift_day=null \
        --recipes person-split     # 3 encoder seeds, ~45 minutes on 2 cores
    .venv/bin/python bench/embedding_lift.py --world lending --users 10000 --recipes person-split
    .venv/bin/python bench/embedding_lift.py --recipes person-split --halvings 0 1   # 3 seeds x 2
    .venv/bin/python bench/embedding_lift.py    # lending's reference world, 6 recipes x 3 seeds

The world is simulated here (its `WorldConfig` defaults; by default the days before its shift)
and its features computed in process, so nothing needs `make demo` first.

Recipes (the scorer and its features-only baseline always learn from the same rows):
- person-split (shipped, `eventml.splits.with_stacking_stages` + `eventml.encoder_data.learning_rows`):
  the encoder learns decision labels from the train rows of half of the people, the scorers from
  the other half, both over the whole train window; the encoder also learns 30-day outlook
  targets (which event types each person has in the month after a decision) from train and gap
  histories whose outlook ends before the first test decision, none from a person who has a
  scorer or valid row; device ids are coded by the order they first appear in each history.
- person-crossfit (not shipped; from each seed's two person-split halvings, `--halvings 0 1`):
  cross-fitting by person. Each train row takes the task probabilities of the halving whose
  encoder never learned its person's labels, every other row the mean of both encoders'; the
  scorers (and the features-only baseline) learn from every train row (`cross_fitted`).
- person-split-hashed-ids: the same, but the encoder reads device ids hashed into 1,024 buckets
  (shipped before first-seen coding, `eventml.sequences`): it recognises people by
  their devices and memorises their outcomes.
- person-split-no-outlook: the same without outlook targets.
- time-split (shipped before this bench's last revision): the encoder learns decision labels from
  the earliest half of the train split, the scorers from the latest half, so a person's labels
  can teach both; outlook targets as in person-split.
- outlook-only: the encoder reads no decision label; the scorers learn from every train row, so
  the encoder learns outlook targets only from people who appear first in the gap. Its task
  heads are untrained: its "encoder" AUC means nothing.
- self-supervised: masked events only; no label, no outlook. Nothing trains the projection from
  the pooled state to the embedding (`Encoder.to_emb`), so this is a random projection of a
  self-supervised state: a lower bound.

Each recipe runs once per encoder seed (the seed of its initial weights and batches) and, for the
person-split recipes, per halving of the people (`--halvings 0 1`: the shipped halves, then the
same halves swapped): the lift moves by a few hundredths from seed to seed and from halving to
halving, so one run is an anecdote; the summary gives every run's lift, the mean and spread.
Each row also gives the lift of a scorer that reads the encoder's own task probabilities beside the embedding ("lift +encoder scores", not shipped). Then, for the first
recipe, the encoder's own AUC on the promotion task split by split with the mean age of the
people it scores (how fast what it learned from labels goes stale), and how much of the oracle's
edge is outcomes the simulator had already drawn, which no history can show.
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
from eventml.risk_model import embedding_columns, model_table
from eventml.scorer import Scorer, ScorerConfig
from eventml.splits import split_decisions, with_stacking_stages
from eventml.worlds import WORLDS, world

RECIPES = (
    "person-split",
    "person-split-hashed-ids",
    "person-split-no-outlook",
    "time-split",
    "outlook-only",
    "self-supervised",
)
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


def staged(splits: pl.DataFrame, recipe: str, halving: int = 0) -> pl.DataFrame:
    """`stage` per row: encoder (its labels teach the encoder), scorer, or none. Halving 1 of a
    person-split recipe swaps the two halves of the people: which people teach the encoder moves
    the lift as much as the encoder's seed does."""
    if recipe.startswith("person-split"):
        stages = with_stacking_stages(splits, encoder_share=0.5)
        if halving:
            swap = {"encoder": "scorer", "scorer": "encoder", "none": "none"}
            stages = stages.with_columns(pl.col("stage").replace_strict(swap))
        return stages
    train = pl.col("split") == "train"
    encoder = pl.lit(False)  # outlook-only, self-supervised: the scorers take every train row
    if recipe == "time-split":
        ts = splits.filter(train)["ts"].sort()
        encoder = pl.col("ts") < ts[len(ts) // 2]
    stage = pl.when(~train).then(pl.lit("none")).when(encoder).then(pl.lit("encoder"))
    return splits.with_columns(stage.otherwise(pl.lit("scorer")).alias("stage"))


def out_of_time(
    table: pl.DataFrame, columns: list[str], pack: DatasetPack
) -> dict[str, dict[str, float]]:
    """Out-of-time ROC AUC and PR AUC per task of a scorer on `columns`, fitted as the scorers
    of a recipe are: on its train rows of stage "scorer", early-stopped on valid, scored on
    matured test rows."""
    tasks = [label.name for label in pack.labels]
    fit_rows = table.filter((pl.col("split") == "train") & (pl.col("stage") == "scorer"))
    valid, test = table.filter(pl.col("split") == "valid"), table.filter(pl.col("split") == "test")
    config = ScorerConfig(monotone=pack.monotone)
    scorer = Scorer.fit(fit_rows, valid, columns, tasks, config, log=lambda line: None)
    predicted = scorer.predict(test)
    out = {}
    for task in tasks:
        known, y = judged(test, task)
        out[task] = {m: f(y, predicted[task][known]) for m, f in METRICS.items()}
    return out


def run(recipe, seed, halving, events, splits, features, pack, args) -> tuple[dict, pl.DataFrame]:
    tasks = [label.name for label in pack.labels]
    splits = staged(splits, recipe, halving)
    unlabelled = recipe in ("outlook-only", "self-supervised")
    config = SequenceModelConfig(
        epochs=args.epochs,
        seed=seed,
        outlook_days=0
        if recipe in ("person-split-no-outlook", "self-supervised")
        else SequenceModelConfig.outlook_days,
        # Without labels nothing is validated: train every epoch, keep the one with the lowest
        # training loss.
        patience=args.epochs if unlabelled else args.patience,
        high_cardinality="hash" if recipe == "person-split-hashed-ids" else "first_seen",
    )
    # What the encoder reads: the unlabelled recipes see no decision label at all.
    encoder_rows = (
        splits.with_columns(pl.lit(None, dtype=pl.Int8).alias(t) for t in tasks)
        if unlabelled
        else splits
    )
    start = time.perf_counter()
    model, _ = train_sequence_model(events, encoder_rows, pack, config, log=lambda line: None)
    seconds = time.perf_counter() - start
    table = model_table(splits, features, embedding_table(model, events, splits))
    names = pack.feature_set().names
    emb = embedding_columns(model.encoder.config.emb_dim)
    # Not shipped, measured beside it: the encoder's own probabilities as inputs too.
    scores = [f"encoder_{task}" for task in tasks]
    baseline, scorer, with_scores = (
        out_of_time(table, names, pack),
        out_of_time(table, names + emb, pack),
        out_of_time(table, names + emb + scores, pack),
    )
    test = table.filter(pl.col("split") == "test")
    row = {
        "recipe": recipe,
        "seed": seed,
        "halving": halving,
        "encoder_s": round(seconds),
        "scorer_rows": table.filter(
            (pl.col("split") == "train") & (pl.col("stage") == "scorer")
        ).height,
    }
    for task in tasks:
        known, y = judged(test, task)
        row[f"{task} test positives"] = int(y.sum())
        for metric, score in METRICS.items():
            figures = {
                "features": baseline[task][metric],
                "+embeddings": scorer[task][metric],
                "encoder": score(y, test[f"encoder_{task}"].to_numpy()[known]),
                "oracle": score(y, test[pack.oracle[task]].to_numpy()[known]),
            }
            row |= {f"{task} {metric} {k}": round(v, 4) for k, v in figures.items()}
            lift = figures["+embeddings"] - figures["features"]
            row[f"{task} {metric} lift"] = round(lift, 4)
            row[f"{task} {metric} lift +encoder scores"] = round(
                with_scores[task][metric] - figures["features"], 4
            )
    return row, table


def cross_fitted(first: pl.DataFrame, second: pl.DataFrame, pack: DatasetPack) -> dict:
    """Cross-fitting by person, from one seed's two halvings (not shipped, measured): the
    halving-0 encoder learned the labels of people A, the halving-1 encoder those of people B.
    Each train row takes the task probabilities of the encoder that never learned its person's
    labels, every other row the mean of both; the scorers then learn from every train row, and
    so does their features-only baseline."""
    tasks = [label.name for label in pack.labels]
    other = second.select(
        "decision_id", *(pl.col(f"encoder_{t}").alias(f"other_{t}") for t in tasks)
    )
    table = first.join(other, on="decision_id", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("stage") == "scorer").then(pl.col(f"encoder_{t}"))
        .when(pl.col("stage") == "encoder").then(pl.col(f"other_{t}"))
        .otherwise((pl.col(f"encoder_{t}") + pl.col(f"other_{t}")) / 2)
        .alias(f"crossfit_{t}")
        for t in tasks
    )  # fmt: skip
    every_train_row = table.with_columns(
        pl.when(pl.col("split") == "train").then(pl.lit("scorer")).otherwise(pl.col("stage"))
        .alias("stage")
    )  # fmt: skip
    names = pack.feature_set().names
    baseline = out_of_time(every_train_row, names, pack)
    scorer = out_of_time(every_train_row, names + [f"crossfit_{t}" for t in tasks], pack)
    row = {"recipe": "person-crossfit", "halving": None, "scorer_rows": every_train_row.filter(
        pl.col("stage") == "scorer").height}  # fmt: skip
    for task in tasks:
        for metric in METRICS:
            row[f"{task} {metric} features"] = round(baseline[task][metric], 4)
            row[f"{task} {metric} +crossfit probabilities"] = round(scorer[task][metric], 4)
            row[f"{task} {metric} lift"] = round(scorer[task][metric] - baseline[task][metric], 4)
    return row


def staleness(table: pl.DataFrame, events: pl.DataFrame, task: str) -> pl.DataFrame:
    """The encoder's own AUC on each split and stage, with how old the people scored are."""
    first = events.group_by("entity_id").agg(pl.col("ts").min().alias("first_event"))
    scored = table.filter(pl.col(f"{task}_matured") & pl.col(task).is_not_null()).join(
        first, on="entity_id", how="left"
    )
    rows = []
    for (split, stage), part in scored.group_by("split", "stage"):
        y = part[task].to_numpy().astype(int)
        rows.append(
            {
                "split": split,
                "stage": stage,
                "labelled": part.height,
                "positives": int(y.sum()),
                "encoder_auc": round(roc_auc_score(y, part[f"encoder_{task}"]), 3),
                "mean_age_days": round(
                    (part["ts"] - part["first_event"]).dt.total_days().mean(), 1
                ),
                "from": part["ts"].min().date(),
            }
        )
    return pl.DataFrame(rows).sort("from")


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", choices=WORLDS, default="lending")
    p.add_argument("--users", type=int, help="default: the world's reference size")
    p.add_argument("--days", type=int, help="default: the days before the world's shift")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other WorldConfig field, e.g. testing_rate=0.002")  # fmt: skip
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--epochs", type=int, default=SequenceModelConfig.epochs)
    p.add_argument("--patience", type=int, default=SequenceModelConfig.patience)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--halvings", type=int, nargs="+", choices=(0, 1), default=[0],
                   help="person-split recipes: 0 the shipped halves of the people, 1 swapped")  # fmt: skip
    p.add_argument("--keep-tables", metavar="DIR",
                   help="write each run's model table (features, embeddings, the encoder's "
                        "probabilities, splits) to DIR/<recipe>-h<halving>-s<seed>.parquet")  # fmt: skip
    args = p.parse_args(argv)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    events, decisions, features, pack = load(args.world, args.users, args.days, options)
    tasks = [label.name for label in pack.labels]
    task = pack.promotion_rules.task
    splits = split_decisions(decisions, pack)
    days = events["ts"].dt.date().n_unique()
    print(f"{args.world} {options}: {events.height:,} events, {decisions.height:,} decisions, "
          f"{days} days")  # fmt: skip
    rows, tables = [], {}
    for recipe in args.recipes:
        halvings = args.halvings if recipe.startswith("person-split") else [0]
        for seed in args.seeds:
            by_halving = {}
            for halving in halvings:
                row, table = run(recipe, seed, halving, events, splits, features, pack, args)
                tables.setdefault(recipe, table)  # the first run's, for the diagnosis below
                by_halving[halving] = table
                if args.keep_tables:
                    Path(args.keep_tables).mkdir(parents=True, exist_ok=True)
                    table.write_parquet(f"{args.keep_tables}/{recipe}-h{halving}-s{seed}.parquet")
                print(row, flush=True)
                rows.append(row)
            if recipe == "person-split" and len(by_halving) == 2:
                row = {**cross_fitted(by_halving[0], by_halving[1], pack), "seed": seed}
                print(row, flush=True)
                rows.append(row)
    results = pl.DataFrame(rows)
    figures = [c for c in results.columns if c.split(" ")[0] in tasks]
    lifts = [c for c in figures if c.endswith(" lift")]
    summary = results.group_by("recipe", maintain_order=True).agg(
        pl.len().alias("runs"),
        *(pl.col(c).mean().round(4) for c in figures),
        *(pl.col(c).std().round(4).alias(f"{c} sd") for c in lifts),
        *(pl.col(c).min().alias(f"{c} min") for c in lifts),
        *(pl.col(c).max().alias(f"{c} max") for c in lifts),
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print("\nthe lift of every run (seeds x halvings)")
        print(results.select("recipe", "halving", "seed", *lifts))
        print("\nmean over runs")
        print(summary.transpose(include_header=True, column_names="recipe"))
        recipe, first = next(iter(tables.items()))
        if recipe not in ("outlook-only", "self-supervised"):  # their task heads are untrained
            print(f"\nthe {recipe} encoder's own {task} AUC, split by split")
            print(staleness(first, events, task))
    print(f"\nthe oracle's edge on {task}:", oracle_edge(first, pack, task))


if __name__ == "__main__":
    main()
