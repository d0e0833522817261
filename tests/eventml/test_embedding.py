"""The sequence model bound to the event table: what it may learn from, and the same data and
config train the same model."""

from dataclasses import replace
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import torch

from eventml.embedding import SequenceModel, SequenceModelConfig, train_sequence_model
from eventml.encoder_data import EncoderData, EventTable, learning_rows
from eventml.labels import build_decisions
from eventml.sequences import SequenceSpec
from eventml.splits import split_decisions, with_stacking_stages
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, simulate


@pytest.fixture(scope="module")
def world():
    events = simulate(WorldConfig(n_users=150, n_days=260, seed=3))
    splits = with_stacking_stages(
        split_decisions(build_decisions(events, LENDING_PACK), LENDING_PACK)
    )
    return events, splits


def weights(events, splits, seed: int) -> dict[str, torch.Tensor]:
    config = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4, seed=seed)
    model, _ = train_sequence_model(events, splits, LENDING_PACK, config, log=lambda line: None)
    return model.encoder.state_dict()


def test_the_same_data_and_seed_train_the_same_model_whatever_ran_before(world):
    first = weights(*world, seed=0)
    torch.rand(1000)  # whatever else drew from torch's global generator in between
    again = weights(*world, seed=0)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_seed_is_what_changes_the_model(world):
    a, b = weights(*world, seed=0), weights(*world, seed=1)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_no_outlook_comes_from_the_test_window_or_a_person_the_scorers_or_validation_see(world):
    events, splits = world
    learn, outlook = learning_rows(events, splits, LENDING_PACK, outlook_days=30)
    assert outlook == tuple(f"{t}_30d" for t in LENDING_PACK.event_types)
    first_test = splits.filter(pl.col("split") == "test")["ts"].min()
    seen = splits.filter((pl.col("stage") == "scorer") | (pl.col("split") == "valid"))["entity_id"]
    known = learn.filter(pl.all_horizontal(pl.col(outlook).is_not_null()))
    assert 0 < known.height < learn.height
    assert (known["ts"] + timedelta(days=30) < first_test).all()
    assert known["split"].is_in(["train", "gap"]).all()
    assert not known["entity_id"].is_in(seen.implode()).any()
    # Decision labels: only on the encoder's stage.
    labelled = learn.filter(pl.col("default_90d").is_not_null() | pl.col("fraud_60d").is_not_null())
    assert labelled.height and (labelled["stage"] == "encoder").all()

    # Each target says whether the person had such an event in the 30 days after the decision.
    for row in known.sample(40, seed=0).iter_rows(named=True):
        after = events.filter(
            (pl.col("entity_id") == row["entity_id"])
            & (pl.col("ts") > row["ts"])
            & (pl.col("ts") <= row["ts"] + timedelta(days=30))
        )
        for event_type in ("payment_late", "application", "session"):
            assert row[f"{event_type}_30d"] == int(event_type in after["event_type"])


def test_without_an_outlook_the_encoder_reads_only_the_decision_labels(world):
    events, splits = world
    learn, outlook = learning_rows(events, splits, LENDING_PACK, outlook_days=0)
    assert outlook == ()
    assert not any(c.endswith("_30d") for c in learn.columns)


def test_a_saved_model_refuses_a_spec_that_codes_ids_differently_from_its_encoder(world, tmp_path):
    events, splits = world
    config = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4)
    model, _ = train_sequence_model(events, splits, LENDING_PACK, config, log=lambda line: None)
    model.save(tmp_path)
    assert SequenceModel.load(tmp_path).sequence_spec == model.sequence_spec
    hashed = SequenceSpec.fit(LENDING_PACK, events, high_cardinality="hash")  # 1,025 device ids
    (tmp_path / "sequence_spec.json").write_text(hashed.to_json())
    with pytest.raises(ValueError, match="different trainings"):
        SequenceModel.load(tmp_path)


@pytest.mark.parametrize("n_labels", [1, 3])
def test_the_encoder_learns_every_label_of_the_spec_however_many(world, n_labels):
    from eventml.schema import Label

    events, _ = world
    third = Label(name="missed_30d", kind="event_within", event_type="payment_missed",
                  horizon_days=30)  # fmt: skip
    labels = (*LENDING_PACK.labels, third)[:n_labels]
    spec = LENDING_PACK.model_copy(update={"labels": labels})
    splits = with_stacking_stages(split_decisions(build_decisions(events, spec), spec))
    config = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4)
    model, _ = train_sequence_model(events, splits, spec, config, log=lambda line: None)
    assert model.tasks == tuple(label.name for label in labels)
    columns = model.output_columns(model.arrays(events, splits.head(5)))
    probabilities = list(columns.values())[config.emb_dim :]
    assert len(probabilities) == n_labels
    assert all(((p >= 0) & (p <= 1)).all() for p in probabilities)


def test_sequences_built_by_parts_of_whole_entities_are_the_whole_builds_rows(world, tmp_path):
    events, splits = world
    table = str(tmp_path / "raw_events")
    events.with_columns(pl.col("ts").dt.date().alias("day")).write_delta(table)
    coding = SequenceSpec.fit(LENDING_PACK, events)
    data = EncoderData.of(events, splits, LENDING_PACK, coding, outlook_days=30, max_len=16)
    whole = dict(zip(("learn", "valid"), data.arrays(), strict=True))
    assert whole["learn"]["outlook"].shape[1] == len(LENDING_PACK.event_types)
    # Held events are cut with the rows; a table is read by each part for its own entities.
    for source in (data, replace(data, events=EventTable(table, 0))):
        parts = source.by_entity(3)
        assert len(parts) == 3
        for rows in ("learn", "valid"):
            ids = pl.concat([getattr(part, rows)["decision_id"] for part in parts])
            assert ids.sort().equals(getattr(data, rows)["decision_id"].sort())
        for part in parts:
            for rows, arrays in zip(("learn", "valid"), part.arrays(), strict=True):
                at = getattr(data, rows)["decision_id"].index_of  # the row in the whole build
                index = [at(i) for i in getattr(part, rows)["decision_id"]]
                assert arrays.keys() == whole[rows].keys()
                for key, values in arrays.items():
                    np.testing.assert_array_equal(values, whole[rows][key][index], err_msg=key)


def test_the_same_model_from_the_events_or_from_their_table(world, tmp_path):
    events, splits = world
    table = str(tmp_path / "raw_events")
    events.with_columns(pl.col("ts").dt.date().alias("day")).write_delta(table)
    config = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4)
    held, _ = train_sequence_model(events, splits, LENDING_PACK, config, log=lambda line: None)
    read, _ = train_sequence_model(
        EventTable(table, 0), splits, LENDING_PACK, config, log=lambda line: None
    )
    assert read.sequence_spec == held.sequence_spec
    mine, theirs = held.encoder.state_dict(), read.encoder.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
