"""eventml.sequences: a decision's prior events become right-aligned arrays, and nothing at or
after the decision instant ever enters them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eventml.encoder import iter_batches
from eventml.schema import TS_TYPE, DatasetSpec
from eventml.sequences import (
    TIME_FEATURES,
    CategoricalCoding,
    SequenceSpec,
    build_one,
    build_sequences,
    first_seen_ids,
    stable_hash,
)
from eventml.sequences import batch as sequences_batch

SPEC = DatasetSpec.from_dict(
    {
        "name": "test",
        "source_start": "2024-01-01T00:00:00Z",
        "event_types": ["login", "purchase", "payment_late", "application"],
        "categorical": ["device_id", "channel"],
        "numeric": ["balance"],
        "decision_event_types": ["application"],
    }
)
T0 = datetime(2024, 3, 1, tzinfo=UTC)
TYPE_ID = {t: i + 1 for i, t in enumerate(SPEC.event_types)}


def frame(rows: list[tuple]) -> pl.DataFrame:
    """rows: (entity_id, event_id, ts, event_type, amount, device_id, channel, balance)."""
    return pl.DataFrame(rows, schema=SPEC.event_schema(), orient="row")


def random_events(seed: int, n: int = 60, entities: str = "abc") -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ts = T0 + timedelta(minutes=int(rng.integers(0, 20 * 24 * 60)))
        amount = None if rng.random() < 0.2 else float(rng.exponential(50))
        rows.append(
            (
                str(rng.choice(list(entities))),
                f"e{i:03d}",
                ts,
                str(rng.choice(SPEC.event_types)),
                amount,
                f"dev{rng.integers(0, 200)}",
                str(rng.choice(["web", "app"])),
                float(rng.normal(0, 500)),
            )
        )
    return frame(rows)


def decisions(rows: list[tuple[str, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "decision_id": list(range(len(rows))),
            "entity_id": [e for e, _ in rows],
            "ts": [t for _, t in rows],
        },
        schema={"decision_id": pl.Int64, "entity_id": pl.String, "ts": TS_TYPE},
    )


def seq_spec(events: pl.DataFrame) -> SequenceSpec:
    return SequenceSpec.fit(SPEC, events, max_vocab=8)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_sequence_holds_the_prior_events_oldest_first_padded_on_the_left():
    events = frame(
        [
            ("a", "1", T0, "login", None, "d1", "web", None),
            ("a", "2", T0 + timedelta(hours=1), "purchase", 99.0, "d1", "web", 10.0),
            ("a", "3", T0 + timedelta(hours=3), "payment_late", 0.0, "d2", "app", -5.0),
            ("a", "4", T0 + timedelta(days=2), "purchase", 5.0, "d2", "app", 1.0),  # after
            ("b", "5", T0, "login", None, "d9", "web", None),  # another entity
        ]
    )
    decision_ts = T0 + timedelta(hours=5)
    out = build_sequences(events, decisions([("a", decision_ts)]), seq_spec(events), max_len=5)

    assert out["mask"][0].tolist() == [False, False, True, True, True]
    assert out["event_type"][0].tolist() == [
        0,
        0,
        TYPE_ID["login"],
        TYPE_ID["purchase"],
        TYPE_ID["payment_late"],
    ]
    time = out["time"][0]
    log_dt_prev, log_dt_decision = (
        TIME_FEATURES.index("log_dt_prev"),
        TIME_FEATURES.index("log_dt_decision"),
    )
    np.testing.assert_allclose(time[2:, log_dt_prev], np.log1p([0.0, 3600.0, 7200.0]), rtol=1e-6)
    np.testing.assert_allclose(
        time[2:, log_dt_decision], np.log1p([5 * 3600.0, 4 * 3600.0, 2 * 3600.0]), rtol=1e-6
    )
    # amount: sign·log1p, then the is-null flag; a null amount is 0 with its flag set.
    amount, amount_null = 0, 2
    assert out["nums"][0, 2, amount] == 0.0 and out["nums"][0, 2, amount_null] == 1.0
    assert (
        out["nums"][0, 3, amount] == pytest.approx(np.log1p(99.0))
        and out["nums"][0, 3, amount_null] == 0.0
    )
    assert out["nums"][0, 4, amount] == 0.0 and out["nums"][0, 4, amount_null] == 0.0
    assert (
        not out["time"][0, :2].any()
        and not out["nums"][0, :2].any()
        and not out["cats"][0, :2].any()
    )


def test_only_the_most_recent_max_len_events_are_kept():
    events = frame(
        [
            ("a", str(i), T0 + timedelta(hours=i), "login", float(i), "d", "web", 0.0)
            for i in range(10)
        ]
    )
    out = build_sequences(
        events, decisions([("a", T0 + timedelta(days=1))]), seq_spec(events), max_len=4
    )
    assert out["mask"][0].all()
    np.testing.assert_allclose(out["nums"][0, :, 0], np.log1p([6.0, 7.0, 8.0, 9.0]), rtol=1e-6)


def test_an_event_at_the_decision_instant_is_not_before_it():
    events = frame(
        [
            ("a", "1", T0, "login", None, "d", "web", None),
            ("a", "2", T0 + timedelta(hours=1), "application", 100.0, "d", "web", None),
        ]
    )
    out = build_sequences(
        events, decisions([("a", T0 + timedelta(hours=1))]), seq_spec(events), max_len=4
    )
    assert out["mask"][0].sum() == 1
    assert out["event_type"][0, -1] == TYPE_ID["login"]


def test_an_entity_without_prior_events_gets_an_all_padding_row():
    events = random_events(0, entities="ab")
    out = build_sequences(
        events,
        decisions([("zz", T0 + timedelta(days=30)), ("a", T0 - timedelta(days=1))]),
        seq_spec(events),
        max_len=8,
    )
    assert not out["mask"].any()
    assert not out["event_type"].any() and not out["nums"].any() and not out["time"].any()
    served = build_one(events.clear(), T0 + timedelta(days=30), seq_spec(events), max_len=8)
    assert served["mask"].shape == (1, 8) and not served["mask"].any()


def test_rows_follow_the_decisions_order_and_labels_keep_missing_as_nan():
    events = random_events(1)
    dec = decisions(
        [
            ("b", T0 + timedelta(days=9)),
            ("a", T0 + timedelta(days=15)),
            ("b", T0 + timedelta(days=3)),
        ]
    )
    dec = dec.with_columns(
        default_90d=pl.Series([1.0, None, 0.0]), fraud_60d=pl.Series([None, None, 1.0])
    )
    spec = seq_spec(events)
    out = build_sequences(events, dec, spec, max_len=8, label_columns=["default_90d", "fraud_60d"])
    np.testing.assert_array_equal(
        out["labels"], np.array([[1, np.nan], [np.nan, np.nan], [0, 1]], np.float32)
    )
    for i in range(len(dec)):
        alone = build_sequences(events, dec[i], spec, max_len=8)
        assert_same({k: v[i : i + 1] for k, v in out.items() if k != "labels"}, alone)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    at_hours=st.integers(0, 20 * 24),
    future=st.lists(
        st.tuples(
            st.integers(0, 10 * 24 * 60), st.sampled_from(SPEC.event_types), st.floats(0, 1e6)
        ),
        max_size=6,
    ),
)
def test_nothing_at_or_after_the_decision_enters_the_sequence(seed, at_hours, future):
    events = random_events(seed)
    decision_ts = T0 + timedelta(hours=at_hours)
    dec = decisions([("a", decision_ts), ("b", decision_ts + timedelta(days=2))])
    spec = seq_spec(events)
    before = build_sequences(events, dec, spec, max_len=6)

    # New events from the decision instant on, and every existing later event rewritten.
    added = frame(
        [
            ("a", f"f{i}", decision_ts + timedelta(minutes=m), t, x, "dev-new", "app", -x)
            for i, (m, t, x) in enumerate(future)
        ]
    )
    later = pl.col("ts") >= decision_ts
    rewritten = events.with_columns(
        amount=pl.when(later).then(123456.0).otherwise(pl.col("amount")),
        event_type=pl.when(later).then(pl.lit("payment_late")).otherwise(pl.col("event_type")),
    )
    after = build_sequences(pl.concat([rewritten, added]), dec[:1], spec, max_len=6)
    assert_same({k: v[:1] for k, v in before.items()}, after)


def test_row_order_of_the_event_table_does_not_matter_even_for_simultaneous_events():
    events = random_events(2)
    ties = frame(
        [
            ("a", f"t{i}", T0 + timedelta(days=1), t, float(i), "d", "web", 0.0)
            for i, t in enumerate(SPEC.event_types)
        ]
    )
    events = pl.concat([events, ties])
    dec = decisions([("a", T0 + timedelta(days=1, hours=1)), ("c", T0 + timedelta(days=12))])
    spec = seq_spec(events)
    assert_same(
        build_sequences(events, dec, spec, max_len=8),
        build_sequences(events.sample(fraction=1.0, shuffle=True, seed=3), dec, spec, max_len=8),
    )


def test_the_serving_builder_agrees_exactly_with_the_batch_builder():
    events = random_events(4, n=120)
    rng = np.random.default_rng(4)
    rows = [
        (str(e), T0 + timedelta(minutes=int(m)))
        for e, m in zip(
            rng.choice(list("abcd"), 12), rng.integers(0, 25 * 24 * 60, 12), strict=True
        )
    ]
    spec = seq_spec(events)
    batch = build_sequences(events, decisions(rows), spec, max_len=16)
    for i, (entity, ts) in enumerate(rows):
        history = events.filter(
            pl.col("entity_id") == entity
        )  # later events too: they must be ignored
        assert_same(
            {k: v[i : i + 1] for k, v in batch.items()}, build_one(history, ts, spec, max_len=16)
        )


def test_rows_gathered_block_by_block_are_the_rows_gathered_at_once(monkeypatch):
    events = random_events(5, n=200)
    rng = np.random.default_rng(5)
    rows = [(str(e), T0 + timedelta(minutes=int(m))) for e, m in zip(
        rng.choice(list("abcdz"), 40), rng.integers(0, 25 * 24 * 60, 40), strict=True)]  # fmt: skip
    spec = seq_spec(events)
    at_once = build_sequences(events, decisions(rows), spec, max_len=16)
    monkeypatch.setattr(sequences_batch, "ROWS_PER_BLOCK", 7)  # 40 rows: 5 blocks of 7, then 5
    assert_same(build_sequences(events, decisions(rows), spec, max_len=16), at_once)


def test_the_serving_builder_orders_simultaneous_events_as_the_batch_builder():
    """Ties in time go by event_id (a missing id first, as the batch sort puts nulls), only the
    last max_len are kept, and a decision time without a zone is UTC."""
    tie = T0 + timedelta(days=2)
    ids = ["t3", None, "t1", "t20", "t2", "s9"]
    events = pl.concat([
        random_events(9, n=40, entities="a"),
        frame([("a", eid, tie, SPEC.event_types[i % 4], float(i), f"dev{i}", "web", -float(i))
               for i, eid in enumerate(ids)]),
    ])  # fmt: skip
    spec = seq_spec(events)
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=1)
    for at in (tie, tie + timedelta(hours=1), tie + timedelta(days=30)):
        for max_len in (3, 8, 64):
            batch = build_sequences(events, decisions([("a", at)]), spec, max_len=max_len)
            assert_same(batch, build_one(shuffled, at.replace(tzinfo=None), spec, max_len))
    last = build_one(shuffled, tie + timedelta(hours=1), spec, max_len=6)["nums"][0, :, 0]
    expected_order = [1, 5, 2, 4, 3, 0]  # the amounts of None, s9, t1, t2, t20, t3
    np.testing.assert_allclose(last, np.log1p(expected_order), rtol=1e-6)


def test_small_categoricals_get_a_vocabulary_and_large_ones_stable_hash_buckets_when_asked():
    events = random_events(5)
    spec = SequenceSpec.fit(SPEC, events, max_vocab=8, high_cardinality="hash", hash_buckets=64)
    channel, device = spec.categorical[1], spec.categorical[0]
    assert channel.vocabulary == ("app", "web") and not channel.hash_buckets
    assert device.hash_buckets == 64 and not device.vocabulary and not device.first_seen

    ids = channel.ids(pl.Series(["web", "app", None, "kiosk"]))
    assert ids.tolist() == [2, 1, 0, 3]  # null → 0; a value unseen in training → V + 1
    # Pinned: the id of a value may never change between processes, platforms or versions.
    assert stable_hash("device-123") == 5744803936057288916
    hashed = device.ids(pl.Series(["device-123", None]))
    assert hashed.tolist() == [1 + 5744803936057288916 % 64, 0]
    assert spec.encoder_dims() == {
        "n_event_types": 5,
        "cat_cardinalities": (65, 4),
        "n_numeric": 4,
        "n_time_features": len(TIME_FEATURES),
    }
    batch = build_sequences(events, decisions([("a", T0 + timedelta(days=30))]), spec, max_len=64)
    at = T0 + timedelta(days=30)
    assert_same(batch, build_one(events.filter(pl.col("entity_id") == "a"), at, spec, 64))


def test_identifiers_are_coded_by_the_order_they_first_appear_in_the_history():
    """A device's id says "the history's first device", "a second one"..., never which device:
    two people with the same behaviour on different devices get the same inputs, so the encoder
    cannot learn who someone is from their device."""
    devices = ["d1", "d1", "d2", "d1", None, "d3", "d4", "d2"]

    def history(entity: str, prefix: str) -> list[tuple]:
        return [
            (
                entity,
                f"{entity}{i}",
                T0 + timedelta(hours=i),
                "login",
                None,
                d and prefix + d,
                "web",
                None,
            )
            for i, d in enumerate(devices)
        ]

    events = frame(history("a", "phone-of-a-") + history("b", "phone-of-b-"))
    spec = SequenceSpec.fit(SPEC, events, max_vocab=1, first_seen=3)
    device = spec.categorical[0]
    assert device.first_seen == 3 and device.cardinality == 4
    at = T0 + timedelta(days=1)
    out = build_sequences(events, decisions([("a", at), ("b", at)]), spec, max_len=10)

    # null (and padding) 0; d1 first, d2 second, d3 third; d4 and later share the cap
    assert out["cats"][0, :, 0].tolist() == [0, 0, 1, 1, 2, 1, 0, 3, 3, 2]
    assert_same({k: v[:1] for k, v in out.items()}, {k: v[1:] for k, v in out.items()})
    # Only the kept events count: among the last 5 (d1, null, d3, d4, d2), d3 is the second.
    last_five = build_sequences(events, decisions([("a", at)]), spec, max_len=5)
    assert last_five["cats"][0, :, 0].tolist() == [1, 0, 2, 3, 3]
    assert_same(last_five, build_one(events.filter(pl.col("entity_id") == "a"), at, spec, 5))


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=6),
       st.integers(1, 4))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_first_seen_ids_match_a_plain_loop(rows, cap):
    K = max(len(r) for r in rows)
    keys = np.zeros((len(rows), K), np.uint64)  # 0: null or padding
    for i, r in enumerate(rows):
        keys[i, K - len(r) :] = r
    expected = []
    for row in keys.tolist():
        order: dict[int, int] = {}
        for key in row:
            if key:
                order.setdefault(key, len(order) + 1)
        expected.append([min(order[k], cap) if k else 0 for k in row])
    assert first_seen_ids(keys, cap).tolist() == expected


def test_declared_categories_are_the_vocabulary_in_their_declared_order():
    declared = DatasetSpec.from_dict(
        {**SPEC.model_dump(), "categories": {"channel": ["web", "app", "phone"]}}
    )
    spec = SequenceSpec.fit(declared, random_events(8), max_vocab=8, hash_buckets=64)
    assert spec.categorical[1].vocabulary == ("web", "app", "phone")
    with pytest.raises(ValueError, match="'device_id' has no declared categories"):
        SequenceSpec.fit(declared)


def test_the_sequence_spec_round_trips_through_json():
    spec = seq_spec(random_events(6))
    assert spec.categorical[0] == CategoricalCoding("device_id", first_seen=8)
    assert SequenceSpec.from_json(spec.to_json()) == spec
    hashed = SequenceSpec.fit(SPEC, random_events(6), max_vocab=8, high_cardinality="hash")
    assert SequenceSpec.from_json(hashed.to_json()) == hashed
    assert CategoricalCoding("x", vocabulary=("a",)).cardinality == 3
    # A spec saved before first-seen coding existed (no such field) still means hash buckets;
    # a first-seen column is saved without the fields such older code requires, so it refuses.
    saved = json.loads(spec.to_json())
    assert saved["categorical"][0] == {"name": "device_id", "first_seen": 8}
    saved["categorical"][0] = {"name": "device_id", "vocabulary": [], "hash_buckets": 64}
    old = SequenceSpec.from_json(json.dumps(saved)).categorical[0]
    assert old == CategoricalCoding("device_id", hash_buckets=64)


def test_unknown_event_types_are_refused_with_the_vocabulary_named():
    events = frame([("a", "1", T0, "login", None, "d", "web", None)])
    spec = seq_spec(events)
    bad = events.with_columns(event_type=pl.lit("teleport"))
    with pytest.raises(ValueError, match="teleport.*validate"):
        build_sequences(bad, decisions([("a", T0 + timedelta(days=1))]), spec)
    with pytest.raises(ValueError, match="teleport.*validate"):
        build_one(bad, T0 + timedelta(days=1), spec)


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
    events = random_events(7, n=200, entities="abcdefgh")
    rng = np.random.default_rng(7)
    rows = [
        (str(e), T0 + timedelta(hours=int(h)))
        for e, h in zip(rng.choice(list("abcdefgh"), 50), rng.integers(0, 500, 50), strict=True)
    ]
    arrays = build_sequences(events, decisions(rows), seq_spec(events), max_len=32)
    arrays["row"] = np.arange(50)  # not a batch key: ignored by iter_batches
    arrays["labels"] = np.arange(50, dtype=np.float32)[:, None]  # to follow rows through batches
    arrays["outlook"] = np.stack([np.arange(50), -np.arange(50)], axis=1).astype(np.float32)

    def seen(**kw):
        return torch.cat([b["labels"][:, 0] for b in iter_batches(arrays, 8, **kw)]).long().tolist()

    assert seen() == list(range(50))
    assert sorted(seen(shuffle=True, seed=1)) == list(range(50))
    assert seen(shuffle=True, seed=1) == seen(shuffle=True, seed=1) != seen(shuffle=True, seed=2)
    batch = next(iter_batches(arrays, 8))
    assert (
        batch["event_type"].dtype == batch["cats"].dtype == torch.int64
        and batch["mask"].dtype == torch.bool
    )

    widths = []
    for b in iter_batches(arrays, 8, shuffle=True, bucket=True):
        width = b["mask"].shape[1]
        widths.append(width)
        kept = b["mask"].sum(1)
        assert width % 16 == 0 or width == 32
        # Per-row targets are never cut with the event columns.
        rows = b["labels"][:, 0]
        assert torch.equal(b["outlook"], torch.stack([rows, -rows], dim=1))
        assert (
            kept == torch.as_tensor(arrays["mask"])[b["labels"][:, 0].long()].sum(1)
        ).all()  # no event cut
    assert min(widths) < 32  # some batch was cut
