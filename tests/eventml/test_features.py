"""Point-in-time features: exact definitions, no leakage from the decision's future, the
request path equal to the batch path, and a day at a time equal to all days at once."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventml.features import (
    EventFilter,
    Feature,
    FeatureSet,
    category_vocab,
    compute_features,
    features_for_one,
)
from eventml.features.batch import HASH_SEED
from eventml.labels import build_decisions
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, simulate

T0 = datetime(2025, 1, 1, tzinfo=UTC)
VOCAB = {
    "region": ("east", "north"),
    "age_band": ("18-24", "25-34"),
    "income_band": ("high", "low", "mid"),
    "merchant_category": ("fashion", "travel"),
    "channel": ("app", "web"),
}
FS = LENDING_PACK.feature_set()
# A categorical's code: its position in the pack's declared categories, from 1.
CODE = {
    c: (lambda v, c=c: LENDING_PACK.categories[c].index(v) + 1) for c in LENDING_PACK.categories
}
# A categorical's code: its position in the pack's declared categories, from 1.
CODE = {
    c: (lambda v, c=c: LENDING_PACK.categories[c].index(v) + 1) for c in LENDING_PACK.categories
}
TYPES = LENDING_PACK.event_types


def frame(rows: list[dict]) -> pl.DataFrame:
    """Events in the spec's schema from dicts with an `hours` offset from T0; the rest is null."""
    schema = LENDING_PACK.event_schema()
    data = {c: [r.get(c) for r in rows] for c in schema}
    data["ts"] = [T0 + timedelta(hours=r["hours"]) for r in rows]
    data["event_id"] = [r.get("event_id", f"e{i:05d}") for i, r in enumerate(rows)]
    return pl.DataFrame(data, schema=schema)


def random_rows(rng: np.random.Generator, n_entities: int, n_events: int, hours: int) -> list[dict]:
    """A lending-shaped history: sign-ups with static attributes, then a mix of events whose times
    fall on whole hours, so ties in time (the hard case for 'strictly before') are common."""
    rows = []
    for u in range(n_entities):
        rows.append({"entity_id": f"u{u}", "hours": int(rng.integers(0, 24)), "event_type": "signup",
                     "region": str(rng.choice(["north", "east", "west"])), "age_band": "25-34",
                     "income_band": str(rng.choice(VOCAB["income_band"])), "channel": "web"})  # fmt: skip
    weights = np.array([0, 6, 4, 3, 2, 1, 1, 1, 1, 0.5, 0.5])
    for _ in range(n_events):
        t = str(rng.choice(TYPES, p=weights / weights.sum()))
        row = {
            "entity_id": f"u{rng.integers(n_entities)}",
            "hours": int(rng.integers(0, hours)),
            "event_type": t,
        }
        if t in ("session", "application", "device_change"):
            row["device_id"] = f"d{rng.integers(4)}"
            row["channel"] = str(rng.choice(["web", "app", "in_store"]))
        if t == "application":
            row |= {"amount": float(np.round(rng.lognormal(5, 1), 2)), "term_months": 3.0,
                    "merchant_category": str(rng.choice(["fashion", "travel", "toys"])),
                    "policy_decision": str(rng.choice(["approve", "decline"]))}  # fmt: skip
        if t.startswith("payment") or t == "chargeback":
            row["amount"] = float(np.round(rng.lognormal(4, 1), 2)) if rng.random() < 0.9 else None
        if t == "profile_change":
            row |= {
                "profile_field": "income",
                "income_band": str(rng.choice(["low", "mid", "unknown"])),
            }
        rows.append(row)
    return rows


def decisions_of(events: pl.DataFrame) -> pl.DataFrame:
    return build_decisions(events, LENDING_PACK)


def assert_same(a: dict, b: dict, names: list[str]) -> None:
    for name in names:
        x, y = a[name], b[name]
        assert (x is None) == (y is None), f"{name}: {x} vs {y}"
        if isinstance(x, float) or isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), name
        else:
            assert x == y, f"{name}: {x} vs {y}"


# ------------------------------------------------------------------ the declaration


def test_every_feature_is_numeric_named_and_explained():
    schema = FS.schema()
    assert len(schema) == len(set(schema)) > 100
    assert all(t in (pl.Int32(), pl.Float64()) for t in schema.values())
    assert all(len(reason) > 5 for reason in FS.reasons().values())
    for name in ("n_application_30d", "amount_max_payment_late_90d", "days_since_device_change",
                 "n_events_1h", "trend_payment_late_30d", "approval_rate_90d", "n_distinct_device_id_7d",
                 "income_band_code", "decision_amount", "decision_merchant_category_code",
                 "n_prior_same_device_id"):  # fmt: skip
        assert name in schema


def test_feature_set_survives_json():
    assert FeatureSet.from_json(FS.to_json()) == FS


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (Feature("x", "count", "r", "3w", EventFilter("session")), "window"),
        (Feature("x", "count", "r"), "needs `events`"),
        (Feature("x", "count", "r", events=EventFilter("teleport")), "not in event_types"),
        (Feature("x", "static", "r", column="planet"), "no vocabulary"),
        (Feature("x", "trend", "r", events=EventFilter("session")), "finite window"),
    ],
)
def test_bad_declarations_say_what_is_wrong(feature, message):
    with pytest.raises(ValueError, match=message):
        FeatureSet((feature,), TYPES, VOCAB)


def test_category_vocab_is_sorted_distinct_values():
    events = frame(
        [
            {"entity_id": "u", "hours": 0, "event_type": "signup", "region": r}
            for r in ("b", "a", "b")
        ]
    )
    assert category_vocab(events, ["region"]) == {"region": ("a", "b")}


# ------------------------------------------------------------------ exact definitions


@pytest.fixture(scope="module")
def small_case():
    """One person's history around a decision at hour 24*40 = day 40."""
    d = 24 * 40
    rows = [
        {
            "entity_id": "u1",
            "hours": 0,
            "event_type": "signup",
            "region": "north",
            "income_band": "low",
        },
        {
            "entity_id": "u1",
            "hours": d - 24 * 90,
            "event_type": "payment_late",
            "amount": 1.0,
        },  # before signup is fine
        {
            "entity_id": "u1",
            "hours": d - 24 * 30,
            "event_type": "payment_late",
            "amount": 10.0,
        },  # window edge: inside
        {"entity_id": "u1", "hours": d - 24 * 40, "event_type": "payment_late", "amount": 30.0},
        {
            "entity_id": "u1",
            "hours": d - 24 * 10,
            "event_type": "profile_change",
            "income_band": "mid",
        },
        {
            "entity_id": "u1",
            "hours": d - 24 * 5,
            "event_type": "application",
            "amount": 200.0,
            "policy_decision": "approve",
            "device_id": "dA",
            "merchant_category": "travel",
        },  # fmt: skip
        {
            "entity_id": "u1",
            "hours": d - 24 * 2,
            "event_type": "application",
            "amount": 50.0,
            "policy_decision": "decline",
            "device_id": "dB",
            "merchant_category": "travel",
        },  # fmt: skip
        {"entity_id": "u1", "hours": d - 24 * 1, "event_type": "session", "device_id": "dA"},
        {
            "entity_id": "u1",
            "hours": d,
            "event_type": "session",
            "device_id": "dC",
        },  # same instant: after
        {
            "entity_id": "u1",
            "hours": d,
            "event_type": "application",
            "amount": 80.0,
            "term_months": 6.0,
            "policy_decision": "approve",
            "device_id": "dA",
            "merchant_category": "fashion",
            "channel": "app",
            "event_id": "the_decision",
        },  # fmt: skip
        {"entity_id": "u1", "hours": d + 1, "event_type": "payment_late", "amount": 999.0},
        {"entity_id": "u2", "hours": d - 3, "event_type": "payment_late", "amount": 5.0},
        # a later decision, so the batch cannot lean on "nothing after the last decision"
        {"entity_id": "u2", "hours": d + 50, "event_type": "application", "amount": 1.0},
    ]
    events = frame(rows)
    everything = compute_features(events, decisions_of(events), FS)
    dec = decisions_of(events).filter(pl.col("decision_id") == "the_decision")
    return (
        events,
        dec,
        everything.filter(pl.col("decision_id") == "the_decision").row(0, named=True),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("n_payment_late_30d", 1),  # [t-30d, t): the edge is in, t itself is out
        ("n_payment_late_90d", 3),
        ("n_payment_late_all", 3),
        ("amount_sum_payment_late_90d", 41.0),
        ("amount_max_payment_late_90d", 30.0),
        ("amount_mean_payment_late_30d", 10.0),
        ("amount_mean_payment_late_1d", None),
        ("trend_payment_late_30d", 1 - 1),  # one in the last 30 days, one in the 30 before
        ("n_application_7d", 2),
        ("approval_rate_7d", 0.5),
        ("approval_rate_1d", None),
        ("days_since_application", 2.0),
        ("days_since_chargeback", None),
        ("n_events_1d", 1),
        ("n_events_all", 8),
        ("n_distinct_device_id_7d", 2),
        ("n_distinct_device_id_1d", 1),
        ("n_distinct_merchant_category_all", 1),
        ("region_code", CODE["region"]("north")),
        ("income_band_code", CODE["income_band"]("mid")),  # the change replaced "low"
        ("age_band_code", None),
        ("decision_amount", 80.0),
        ("decision_term_months", 6.0),
        ("decision_merchant_category_code", CODE["merchant_category"]("fashion")),
        ("decision_channel_code", CODE["channel"]("app")),
        ("n_prior_same_device_id", 2),  # dA twice before; dC at the same instant does not count
    ],
)
def test_feature_definitions(small_case, name, expected):
    events, dec, row = small_case
    assert row[name] == expected
    online = features_for_one(events, dec.row(0, named=True), FS)
    assert online[name] == expected


def test_unknown_category_is_zero_and_missing_is_null():
    events = frame([
        {"entity_id": "u", "hours": 0, "event_type": "signup", "region": "atlantis"},
        {"entity_id": "u", "hours": 5, "event_type": "application", "amount": 1.0, "policy_decision": "approve"},
    ])  # fmt: skip
    row = compute_features(events, decisions_of(events), FS).row(0, named=True)
    assert row["region_code"] == 0
    assert row["decision_merchant_category_code"] is None
    assert row["n_prior_same_device_id"] is None


def test_the_latest_known_value_among_simultaneous_events_goes_by_event_id():
    events = frame([
        {"entity_id": "u", "hours": 0, "event_type": "signup", "income_band": "low", "event_id": "e2"},
        {"entity_id": "u", "hours": 0, "event_type": "profile_change", "income_band": "high", "event_id": "e10"},
        {"entity_id": "u", "hours": 0, "event_type": "profile_change", "income_band": "mid", "event_id": "e1"},
        {"entity_id": "u", "hours": 5, "event_type": "application", "amount": 1.0, "policy_decision": "approve",
         "event_id": "e3"},
    ])  # fmt: skip
    low = LENDING_PACK.categories["income_band"].index("low") + 1  # "e2" sorts after "e10" and "e1"
    decision = decisions_of(events)
    assert compute_features(events, decision, FS)["income_band_code"].to_list() == [low]
    for history in (events, events.reverse()):
        assert features_for_one(history, decision.row(0, named=True), FS)["income_band_code"] == low


def test_a_decision_without_history_gets_zero_counts_and_null_statistics():
    events = frame([{"entity_id": "new", "hours": 3, "event_type": "application", "amount": 9.0,
                     "policy_decision": "approve", "device_id": "d"}])  # fmt: skip
    row = compute_features(events, decisions_of(events), FS).row(0, named=True)
    assert row["n_events_all"] == 0 and row["n_distinct_device_id_all"] == 0
    assert row["n_prior_same_device_id"] == 0
    assert row["days_since_signup"] is None and row["amount_max_application_all"] is None
    assert row["decision_amount"] == 9.0


def test_no_decisions_gives_an_empty_table_with_the_schema():
    events = frame([{"entity_id": "u", "hours": 0, "event_type": "session"}])
    out = compute_features(events, decisions_of(events), FS)
    assert out.height == 0 and out.columns == ["decision_id", *FS.names]


# ------------------------------------------------------------------ properties

later_event = st.fixed_dictionaries({
    "entity": st.integers(0, 2),
    "delay_hours": st.integers(0, 24 * 100),  # 0: the decision's own instant
    "event_type": st.sampled_from(TYPES),
    "amount": st.one_of(st.none(), st.floats(0, 5000)),
    "device_id": st.sampled_from([None, "d0", "d1", "d9"]),
    "merchant_category": st.sampled_from([None, "fashion", "toys"]),
    "policy_decision": st.sampled_from([None, "approve", "decline"]),
    "income_band": st.sampled_from([None, "low", "high"]),
})  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    pick=st.integers(0, 10_000),
    added=st.lists(later_event, max_size=5),
    drop=st.sets(st.integers(0, 200), max_size=20),
    change=st.sets(st.integers(0, 200), max_size=20),
)
def test_events_at_or_after_a_decision_never_change_its_features(seed, pick, added, drop, change):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, n_entities=3, n_events=120, hours=24 * 60)
    events = frame(rows)
    decisions = decisions_of(events)
    t = decisions["ts"].sort()[pick % decisions.height]
    hours = int((t - T0).total_seconds() // 3600)
    future = [i for i, r in enumerate(rows) if r["hours"] >= hours and r.get("event_id") is None]
    keep = []
    for i, r in enumerate(rows):
        if i in future and i in drop:
            continue  # removed
        if i in future and i in change:
            r = r | {
                "event_type": "payment_late",
                "amount": 1e6,
                "device_id": "d-new",
                "income_band": "high",
            }
        keep.append(r | {"event_id": f"e{i:05d}"})
    for j, a in enumerate(added):
        keep.append({"entity_id": f"u{a['entity']}", "hours": hours + a["delay_hours"], "event_id": f"x{j}",
                     **{k: a[k] for k in ("event_type", "amount", "device_id", "merchant_category",
                                          "policy_decision", "income_band")}})  # fmt: skip
    before = compute_features(events, decisions, FS)
    after = compute_features(frame(keep), decisions, FS)
    settled = decisions.filter(pl.col("ts") <= t)["decision_id"]
    assert settled.len() > 0
    a = before.filter(pl.col("decision_id").is_in(settled.implode())).sort("decision_id")
    b = after.filter(pl.col("decision_id").is_in(settled.implode())).sort("decision_id")
    assert a.equals(b)


def check_parity(
    events: pl.DataFrame, decisions: pl.DataFrame, fs: FeatureSet, sample: int, seed: int
) -> int:
    batch = compute_features(events, decisions, fs)
    rows = {r["decision_id"]: r for r in batch.iter_rows(named=True)}
    rng = np.random.default_rng(seed)
    chosen = rng.choice(decisions.height, min(sample, decisions.height), replace=False)
    for i in chosen:
        d = decisions.row(int(i), named=True)
        history = events.filter((pl.col("entity_id") == d["entity_id"]) & (pl.col("ts") < d["ts"]))
        assert_same(features_for_one(history, d, fs), rows[d["decision_id"]], fs.names)
    return len(chosen)


def test_request_path_equals_batch_on_random_histories():
    events = frame(
        random_rows(np.random.default_rng(11), n_entities=25, n_events=3000, hours=24 * 200)
    )
    assert check_parity(events, decisions_of(events), FS, sample=60, seed=1) == 60


@pytest.fixture(scope="module")
def world() -> pl.DataFrame:
    return simulate(WorldConfig(n_users=300, n_days=120, seed=5))


def test_request_path_equals_batch_on_the_simulated_world(world):
    assert check_parity(world, decisions_of(world), FS, sample=60, seed=2) == 60


def test_request_path_ignores_the_future_and_other_entities(world):
    decisions = decisions_of(world)
    d = decisions.row(decisions.height // 2, named=True)
    own_past = world.filter((pl.col("entity_id") == d["entity_id"]) & (pl.col("ts") < d["ts"]))
    assert features_for_one(world, d, FS) == features_for_one(own_past, d, FS)


def test_one_day_at_a_time_equals_all_days_at_once(world):
    decisions = decisions_of(world)
    all_at_once = compute_features(world, decisions, FS).sort("decision_id")
    days = decisions["ts"].dt.date().unique().sort()
    parts = []
    for day in days:
        end = datetime.combine(day, datetime.min.time(), UTC) + timedelta(days=1)
        upto_day = world.filter(pl.col("ts") < end)  # what the store holds at the end of that day
        parts.append(
            compute_features(upto_day, decisions.filter(pl.col("ts").dt.date() == day), FS)
        )
    assert pl.concat(parts).sort("decision_id").equals(all_at_once)
    assert len(parts) > 100


def test_shuffled_events_give_the_same_features(world):
    decisions = decisions_of(world)
    a = compute_features(world, decisions, FS).sort("decision_id")
    b = compute_features(world.sample(fraction=1.0, shuffle=True, seed=3), decisions, FS).sort(
        "decision_id"
    )
    assert a.equals(b)


@pytest.mark.parametrize("threads", ["2", "3", "7"])
def test_the_walk_split_over_threads_gives_the_same_bits_as_one(world, monkeypatch, threads):
    decisions = decisions_of(world)
    monkeypatch.setenv("EVENTML_THREADS", "1")
    one = compute_features(world, decisions, FS)
    monkeypatch.setenv("EVENTML_THREADS", threads)
    assert compute_features(world, decisions, FS).equals(one)


@pytest.mark.parametrize("threads", ["2", "5"])
def test_the_split_holds_for_an_entity_larger_than_a_part_and_decisions_without_history(
    monkeypatch, threads
):
    rng = np.random.default_rng(11)
    events = frame(random_rows(rng, 8, 1_500, hours=24 * 90))
    # Two entities get most events: the first in the split's order (the smallest hash) and one
    # in the middle. The cuts fall inside them: a part without events first, then parts of
    # several entities, and entities bigger than a part.
    ids = events["entity_id"].unique()
    order = ids.gather(ids.hash(HASH_SEED).arg_sort())
    first, middle = order[0], order[len(order) // 2]
    draw = pl.Series(rng.random(events.height))
    events = events.with_columns(
        pl.when(pl.col("event_type") == "signup")
        .then(pl.col("entity_id"))
        .when(draw < 0.3)
        .then(pl.lit(first))
        .when(draw < 0.8)
        .then(pl.lit(middle))
        .otherwise(pl.col("entity_id"))
        .alias("entity_id")
    )
    decisions = decisions_of(events)
    newcomer = decisions.head(3).with_columns(  # decided before any event of theirs is stored
        pl.lit("newcomer").alias("entity_id"),
        pl.format("new-{}", "decision_id").alias("decision_id"),
    )
    decisions = pl.concat([decisions, newcomer])
    monkeypatch.setenv("EVENTML_THREADS", "1")
    one = compute_features(events, decisions, FS)
    monkeypatch.setenv("EVENTML_THREADS", threads)
    assert compute_features(events, decisions, FS).equals(one)
    assert one.filter(pl.col("decision_id").str.starts_with("new-")).height == 3


def test_an_unknown_event_type_is_named():
    events = frame([{"entity_id": "u", "hours": 0, "event_type": "teleport"},
                    {"entity_id": "u", "hours": 3, "event_type": "application"}])  # fmt: skip
    with pytest.raises(ValueError, match="event_type outside the feature set"):
        compute_features(events, decisions_of(events), FS)
