"""A third event source, written as a user would bring it: a marketplace that decides on each
order whether it will be returned, with its own column names, its own pack and its own files.

Not a built-in world: nothing in `eventml` knows it. Customers visit, order and sometimes return;
an order is returned more often by customers who returned before, for large baskets and where the
shop's return window is long, and a dispute flag on the order (a column label, known 30 days
later) follows earlier disputes. The shops' return windows are a reference table of their own
(`shops`, keyed by shop, each row in force from its `effective` date): they change mid-year.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

PACK = """
name: returns_marketplace
source_start: 2025-01-01T00:00:00Z
partitions: {start: 2025-01-01, days: 365}
event_types: [visit, order, return_request]
categorical: [shop]
numeric: [basket_items, was_disputed, return_days]
categories: {shop: [books, garden, toys]}
references:
  - {name: shops, key: shop, columns: [return_days], valid_from: effective}
columns: {entity_id: customer, event_id: id, ts: when, event_type: what, amount: value}
decision_event_types: [order]
labels:
  - {name: returned_14d, kind: event_within, event_type: return_request, horizon_days: 14}
  - {name: disputed, kind: column, column: was_disputed, horizon_days: 30}
features:
  windows: [7d, 30d, all]
  statistics: [{event_types: [order, return_request]},
               {column: basket_items, event_types: [order], stats: [mean, max]}]
  distinct_columns: [shop]
  decision_columns: [amount, basket_items, shop, return_days]
monotone: {n_return_request_all: 1}
segments: [{name: history, feature: n_order_all, breaks: [0], labels: [first order, returning]}]
policy: {returned_14d: 0.6, disputed: 0.5}
promotion: {task: returned_14d, max_ece: 0.2}
"""
START = datetime(2025, 1, 1, tzinfo=UTC)
SHOPS = ("books", "garden", "toys")
# Each shop's return window in days, from a date on (the `shops` reference table).
TERMS = (
    ("books", START, 14.0),
    ("garden", START, 14.0),
    ("garden", START + timedelta(days=60), 30.0),
    ("toys", START, 30.0),
    ("toys", START + timedelta(days=90), 14.0),
)


def return_days(shop: str, at: datetime) -> float:
    return max((t for t in TERMS if t[0] == shop and t[1] <= at), key=lambda t: t[1])[2]


def shops() -> pl.DataFrame:
    """The `shops` reference table in the marketplace's own names, as text."""
    return pl.DataFrame(
        [(shop, at.strftime("%Y-%m-%d"), str(days)) for shop, at, days in TERMS],
        schema=["shop", "effective", "return_days"],
        orient="row",
    )


def events(n_customers: int = 400, n_days: int = 150, seed: int = 0) -> pl.DataFrame:
    """The marketplace's events in its own column names, every value as text (as a CSV has it)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    for c in range(n_customers):
        returner = rng.random() < 0.3
        disputer = rng.random() < 0.15
        t = START + timedelta(hours=float(rng.uniform(0, 24 * 4)))
        end = START + timedelta(days=n_days)
        returns = disputes = 0
        while t < end:
            kind = rng.random()
            if kind < 0.6:
                rows.append((c, t, "visit", None, str(rng.choice(SHOPS)), None, None))
            else:
                items = int(rng.integers(1, 8))
                # Disputing customers buy toys: the only trace of them an input can carry.
                shop = "toys" if disputer and rng.random() < 0.9 else str(rng.choice(SHOPS))
                value = round(float(rng.lognormal(3.5, 0.6)) * items, 2)
                logit = -3.2 + 1.2 * returner + 0.5 * min(returns, 3) + 0.25 * (items - 4)
                logit += 0.9 * (return_days(shop, t) > 14)
                disputed = rng.random() < 1 / (
                    1 + np.exp(-(-4.0 + 3.0 * disputer + 0.5 * min(disputes, 2)))
                )
                rows.append((c, t, "order", value, shop, items, float(disputed)))
                disputes += int(disputed)
                if rng.random() < 1 / (1 + np.exp(-logit)):
                    back = t + timedelta(days=float(rng.uniform(1, 13)))
                    rows.append((c, back, "return_request", value, shop, None, None))
                    returns += 1
            t += timedelta(hours=float(rng.exponential(24 * 4)))
    frame = pl.DataFrame(
        rows,
        schema={
            "c": pl.Int64,
            "when": pl.Datetime("us", "UTC"),
            "what": pl.String,
            "value": pl.Float64,
            "shop": pl.String,
            "basket_items": pl.Int64,
            "was_disputed": pl.Float64,
        },  # fmt: skip
        orient="row",
    ).sort("when")
    return frame.select(
        ("cust-" + pl.col("c").cast(pl.String)).alias("customer"),
        ("o" + pl.int_range(pl.len()).cast(pl.String)).alias("id"),
        pl.col("when").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        "what",
        pl.col("value").cast(pl.String),
        "shop",
        pl.col("basket_items").cast(pl.String),
        pl.col("was_disputed").cast(pl.String),
    )


def land(zone: Path, frame: pl.DataFrame) -> Path:
    """The pack, one CSV file per month and the shops' terms in a landing zone; returns the
    pack's path."""
    (zone / "references" / "shops").mkdir(parents=True, exist_ok=True)
    shops().write_csv(zone / "references" / "shops" / "terms.csv")
    pack = zone / "pack.yaml"
    pack.write_text(PACK)
    month = pl.col("when").str.slice(0, 7)
    for (name,), part in frame.with_columns(month.alias("__m")).group_by("__m"):
        part.drop("__m").write_csv(zone / f"orders-{name}.csv")
    return pack
