"""Where the embedding lift goes: the out-of-time AUC of features-only vs features + embeddings,
on the demo's own tables, for the shipped training recipe and the alternatives tried against it.

    make demo                                   # the tables this reads (days 0-299)
    .venv/bin/python bench/embedding_lift.py    # 6 recipes x 3 encoder seeds, ~3 hours on 2 cores
    .venv/bin/python bench/embedding_lift.py --recipes person-split --seeds 0

Recipes (the scorer and its features-only baseline always learn from the same rows):
- person-split (shipped, `eventml.splits.with_stacking_stages` + `eventml.embedding.learning_rows`):
  the encoder learns decision labels from the train rows of half of the people, the scorers from
  the other half, both over the whole train window; the encoder also learns 30-day outlook
  targets (which event types each person has in the month after a decision) from train and gap
  histories whose outlook ends before the first test decision, none from a person who has a
  scorer or valid row; device ids are coded by the order they first appear in each history.
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

Each recipe runs once per encoder seed (the seed of its initial weights and batches): the lift
moves by a few hundredths from seed to seed, so one run is an anecdote; the summary gives the
mean and spread. Each row also gives the lift of a scorer that reads the encoder's own task
probabilities beside the embedding ("lift +encoder scores", not shipped). Then, for the first
recipe, the encoder's own default AUC split by split with the mean age of the people it scores
(how fast what it learned from labels goes stale); how much of the oracle's edge is outcomes the
simulator has already drawn and no history can show; and the one sequence detail measured to
matter that the features leave out (the days-late magnitude of the last payments): what it adds
to the features, and how much of it each embedding holds.
"""

from __future__ import annotations

import argparse
import time

import polars as pl
import xgboost as xgb
from sklearn.metrics import r2_score, roc_auc_score

from eventml.embedding import SequenceModelConfig, embedding_table, train_sequence_model
from eventml.home import StateHome
from eventml.labels import build_decisions
from eventml.risk_model import embedding_columns, model_table
from eventml.scorer import Scorer, ScorerConfig
from eventml.splits import split_decisions, with_stacking_stages
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig

TASK = LENDING_PACK.promotion_rules.task  # the label promotion decides on

RECIPES = (
    "person-split",
    "person-split-hashed-ids",
    "person-split-no-outlook",
    "time-split",
    "outlook-only",
    "self-supervised",
)
ORACLE = LENDING_PACK.oracle


def load(days: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The demo's events of its first `days` days, their decisions, and their features."""
    tables = StateHome.from_env().tables / "eventml"
    first = pl.scan_delta(str(tables / "raw_events")).select(pl.col("day").min()).collect().item()
    events = (
        pl.scan_delta(str(tables / "raw_events"))
        .filter(pl.col("day") < first + pl.duration(days=days))
        .drop("day")
        .collect()
    )
    decisions = build_decisions(events, LENDING_PACK)
    features = (
        pl.scan_delta(str(tables / "decision_features"))
        .join(decisions.lazy().select("decision_id"), on="decision_id", how="semi")
        .collect()
    )
    return events, decisions, features


def staged(splits: pl.DataFrame, recipe: str) -> pl.DataFrame:
    """`stage` per row: encoder (its labels teach the encoder), scorer, or none."""
    if recipe.startswith("person-split"):
        return with_stacking_stages(splits, encoder_share=0.5)
    train = pl.col("split") == "train"
    encoder = pl.lit(False)  # outlook-only, self-supervised: the scorers take every train row
    if recipe == "time-split":
        ts = splits.filter(train)["ts"].sort()
        encoder = pl.col("ts") < ts[len(ts) // 2]
    stage = pl.when(~train).then(pl.lit("none")).when(encoder).then(pl.lit("encoder"))
    return splits.with_columns(stage.otherwise(pl.lit("scorer")).alias("stage"))


def out_of_time_aucs(table: pl.DataFrame, columns: list[str], tasks: list[str]) -> dict[str, float]:
    """Out-of-time AUC per task of a scorer on `columns`, fitted as the scorers of a recipe are:
    on its train rows of stage "scorer", early-stopped on valid, scored on matured test rows."""
    fit_rows = table.filter((pl.col("split") == "train") & (pl.col("stage") == "scorer"))
    valid, test = table.filter(pl.col("split") == "valid"), table.filter(pl.col("split") == "test")
    scorer = Scorer.fit(
        fit_rows,
        valid,
        columns,
        tasks,
        ScorerConfig(monotone=LENDING_PACK.monotone),
        log=lambda line: None,
    )
    predicted = scorer.predict(test)
    aucs = {}
    for task in tasks:
        known = (test[f"{task}_matured"] & test[task].is_not_null()).to_numpy()
        y = test[task].to_numpy()[known].astype(int)
        aucs[task] = roc_auc_score(y, predicted[task][known])
    return aucs


def run(recipe, seed, events, splits, features, tasks, args) -> tuple[dict, pl.DataFrame]:
    splits = staged(splits, recipe)
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
    model, _ = train_sequence_model(
        events, encoder_rows, LENDING_PACK, config, log=lambda line: None
    )
    seconds = time.perf_counter() - start
    table = model_table(splits, features, embedding_table(model, events, splits))
    names = LENDING_PACK.feature_set().names
    emb = embedding_columns(model.encoder.config.emb_dim)
    # Not shipped, measured beside it: the encoder's own probabilities as inputs too.
    scores = [f"encoder_{task}" for task in tasks]
    baseline, scorer, with_scores = (
        out_of_time_aucs(table, names, tasks),
        out_of_time_aucs(table, names + emb, tasks),
        out_of_time_aucs(table, names + emb + scores, tasks),
    )
    test = table.filter(pl.col("split") == "test")
    row = {
        "recipe": recipe,
        "seed": seed,
        "encoder_s": round(seconds),
        "scorer_rows": table.filter(
            (pl.col("split") == "train") & (pl.col("stage") == "scorer")
        ).height,
    }
    for task in tasks:
        known = (test[f"{task}_matured"] & test[task].is_not_null()).to_numpy()
        y = test[task].to_numpy()[known].astype(int)
        auc = {
            "features": baseline[task],
            "+embeddings": scorer[task],
            "encoder": roc_auc_score(y, test[f"encoder_{task}"].to_numpy()[known]),
            "oracle": roc_auc_score(y, test[ORACLE[task]].to_numpy()[known]),
        }
        row |= {f"{task} {k}": round(v, 4) for k, v in auc.items()}
        row[f"{task} lift"] = round(auc["+embeddings"] - auc["features"], 4)
        row[f"{task} lift +encoder scores"] = round(with_scores[task] - auc["features"], 4)
    return row, table


def staleness(table: pl.DataFrame, events: pl.DataFrame, task: str = TASK) -> pl.DataFrame:
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


def oracle_edge(table: pl.DataFrame) -> dict:
    """Test defaults the simulator had already drawn (true p = 1) and whether a missed payment
    shows them, and the oracle's AUC without them."""
    test = table.filter(
        (pl.col("split") == "test") & pl.col(f"{TASK}_matured") & pl.col(TASK).is_not_null()
    )
    drawn = test.filter(pl.col("true_p_default") >= 0.999)
    rest = test.filter(pl.col("true_p_default") < 0.999)
    return {
        "test positives": int(test[TASK].sum()),
        "already drawn (true p = 1)": int(drawn[TASK].sum()),
        "of those, a missed payment in the history": int((drawn["n_payment_missed_90d"] > 0).sum()),
        "oracle AUC without them": round(
            roc_auc_score(rest[TASK], rest[LENDING_PACK.oracle[TASK]]), 4
        ),
    }


def days_late_gap(table: pl.DataFrame, events: pl.DataFrame) -> dict:
    """The days late of each person's last three payments before the decision (mean and max):
    the promotion task's AUC it adds to the features-only scorer on the recipe's own rows, and how
    much of its mean (R² on test rows with a payment) the features, the embedding and both
    recover."""
    payments = (
        events.filter(pl.col("days_late").is_not_null())
        .select("entity_id", pl.col("ts").alias("paid_at"), "days_late")
        .sort("paid_at")
        .with_columns(
            pl.col("days_late")
            .rolling_mean(3, min_samples=1)
            .over("entity_id")
            .alias("late_mean3"),
            pl.col("days_late").rolling_max(3, min_samples=1).over("entity_id").alias("late_max3"),
        )
        .drop("days_late")
    )
    table = table.sort("ts").join_asof(
        payments, left_on="ts", right_on="paid_at", by="entity_id",
        strategy="backward", allow_exact_matches=False, check_sortedness=False,
    )  # fmt: skip
    names = LENDING_PACK.feature_set().names
    emb = [c for c in table.columns if c.startswith("emb_")]
    out = {}
    for name, extra in (
        ("features", []),
        ("features + last 3 payments' days late", ["late_mean3", "late_max3"]),
    ):
        auc = out_of_time_aucs(table, names + extra, [TASK])[TASK]
        out[f"{name} AUC"] = round(auc, 4)
    paid = table.filter(pl.col("late_mean3").is_not_null())
    fit, held = paid.filter(pl.col("split") != "test"), paid.filter(pl.col("split") == "test")
    for name, cols in (("features", names), ("embedding", emb), ("both", names + emb)):
        model = xgb.XGBRegressor(n_estimators=300, max_depth=4, learning_rate=0.05, n_jobs=2)
        model.fit(fit.select(cols).to_numpy(), fit["late_mean3"].to_numpy())
        predicted = model.predict(held.select(cols).to_numpy())
        out[f"R² of its mean from {name}"] = round(r2_score(held["late_mean3"], predicted), 3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--days", type=int, default=WorldConfig.shift_day or WorldConfig.n_days)
    p.add_argument("--epochs", type=int, default=SequenceModelConfig.epochs)
    p.add_argument("--patience", type=int, default=SequenceModelConfig.patience)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    events, decisions, features = load(args.days)
    tasks = [label.name for label in LENDING_PACK.labels]
    splits = split_decisions(decisions, LENDING_PACK)
    print(f"{events.height:,} events, {decisions.height:,} decisions, days 0-{args.days - 1}")
    rows, tables = [], {}
    for recipe in args.recipes:
        for seed in args.seeds:
            row, table = run(recipe, seed, events, splits, features, tasks, args)
            tables.setdefault(recipe, table)  # the first seed's, for the diagnosis below
            print(row, flush=True)
            rows.append(row)
    results = pl.DataFrame(rows)
    figures = [c for c in results.columns if c.split(" ")[0] in tasks]
    summary = results.group_by("recipe", maintain_order=True).agg(
        pl.len().alias("seeds"),
        *(pl.col(c).mean().round(4) for c in figures),
        *(pl.col(f"{t} lift").std().round(4).alias(f"{t} lift sd") for t in tasks),
        *(pl.col(f"{t} lift").min().alias(f"{t} lift min") for t in tasks),
        *(pl.col(f"{t} lift").max().alias(f"{t} lift max") for t in tasks),
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print("\nmean over seeds")
        print(summary.transpose(include_header=True, column_names="recipe"))
        recipe, first = next(iter(tables.items()))
        if recipe not in ("outlook-only", "self-supervised"):  # their task heads are untrained
            print(f"\nthe {recipe} encoder's own {TASK} AUC, split by split")
            print(staleness(first, events))
    print(f"\nthe oracle's edge on {TASK}:", oracle_edge(first))
    print("\nthe days late of the last payments, which no feature holds (first seed's tables):")
    for recipe, table in tables.items():
        print(f"  {recipe}: {days_late_gap(table, events)}")


if __name__ == "__main__":
    main()
