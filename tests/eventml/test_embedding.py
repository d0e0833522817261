"""The sequence model bound to the event table: one encoder per fold of people, what each may
learn from, the cross-fitted outputs the scorers read, and the same data and config train the
same model."""

import shutil
from dataclasses import replace
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import torch

from eventml.embedding import (
    SequenceModel,
    SequenceModelConfig,
    embedding_table,
    train_sequence_model,
)
from eventml.encoder import predict
from eventml.encoder_data import EncoderData, EventTable, learning_rows
from eventml.labels import build_decisions
from eventml.sequences import SequenceSpec
from eventml.splits import split_decisions, with_person_folds
from eventml.worlds.lending import PACK as LENDING_PACK
from eventml.worlds.lending import WorldConfig, simulate


@pytest.fixture(scope="module")
def world():
    events = simulate(WorldConfig(n_users=150, n_days=260, seed=3))
    splits = with_person_folds(split_decisions(build_decisions(events, LENDING_PACK), LENDING_PACK))
    return events, splits


TINY = SequenceModelConfig(epochs=1, d_model=16, n_layers=1, max_len=16, emb_dim=4)


def state(model: SequenceModel) -> dict[str, torch.Tensor]:
    """Every fold's weights, by fold and name."""
    return {
        f"{fold}.{name}": tensor
        for fold, encoder in enumerate(model.encoders)
        for name, tensor in encoder.state_dict().items()
    }


def weights(events, splits, seed: int) -> dict[str, torch.Tensor]:
    config = replace(TINY, seed=seed)
    model, _ = train_sequence_model(events, splits, LENDING_PACK, config, log=lambda line: None)
    return state(model)


@pytest.fixture(scope="module")
def model(world) -> SequenceModel:
    events, splits = world
    return train_sequence_model(events, splits, LENDING_PACK, TINY, log=lambda line: None)[0]


def test_the_same_data_and_seed_train_the_same_model_whatever_ran_before(world):
    first = weights(*world, seed=0)
    torch.rand(1000)  # whatever else drew from torch's global generator in between
    again = weights(*world, seed=0)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_seed_is_what_changes_the_model(world):
    a, b = weights(*world, seed=0), weights(*world, seed=1)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_each_folds_encoder_learns_labels_from_its_own_people_and_no_outlook_the_others_see(world):
    events, splits = world
    assert set(splits["fold"]) == {0, 1}
    first_test = splits.filter(pl.col("split") == "test")["ts"].min()
    for fold in (0, 1):
        learn, outlook = learning_rows(events, splits, LENDING_PACK, fold, outlook_days=30)
        assert outlook == tuple(f"{t}_30d" for t in LENDING_PACK.event_types)
        # The self-supervised task reads every train and gap history.
        assert learn.height == splits.filter(pl.col("split").is_in(["train", "gap"])).height
        # Decision labels: only on the fold's people's train rows.
        labelled = learn.filter(pl.any_horizontal(pl.col("default_90d", "fraud_60d").is_not_null()))
        assert (
            labelled.height and ((labelled["split"] == "train") & (labelled["fold"] == fold)).all()
        )
        # No outcome of the test window, and none of a person whose train labels the other
        # fold learns or who has a validation row, is an outlook target.
        seen = splits.filter(
            ((pl.col("split") == "train") & (pl.col("fold") != fold)) | (pl.col("split") == "valid")
        )["entity_id"]
        known = learn.filter(pl.all_horizontal(pl.col(outlook).is_not_null()))
        assert 0 < known.height < learn.height
        assert (known["ts"] + timedelta(days=30) < first_test).all()
        assert known["split"].is_in(["train", "gap"]).all()
        assert not known["entity_id"].is_in(seen.implode()).any()

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
    learn, outlook = learning_rows(events, splits, LENDING_PACK, 0, outlook_days=0)
    assert outlook == ()
    assert not any(c.endswith("_30d") for c in learn.columns)


def test_every_decision_of_a_person_takes_the_encoder_that_never_learned_their_labels(world, model):
    events, splits = world
    table = embedding_table(model, events, splits)
    arrays = model.arrays(events, splits)
    alone = [predict(encoder, arrays) for encoder in model.encoders]
    fold = splits["fold"].to_numpy()
    # A live decision's person is in the fold training dealt them to, from their id alone.
    np.testing.assert_array_equal(model.folds_of(splits["entity_id"]), fold)
    live = model.output_columns(arrays, fold)  # each encoder on the rows it scores only
    for task in model.tasks:
        other = np.where(fold == 0, alone[1][task], alone[0][task]).astype(np.float64)
        np.testing.assert_array_equal(table[f"encoder_{task}"].to_numpy(), other)
        np.testing.assert_array_equal(live[f"encoder_{task}"], other)
    # The embedding is every fold's side by side, the same for every row.
    assert [c for c in table.columns if c.startswith("emb_")] == [f"emb_{i}" for i in range(8)]


def test_splits_without_folds_or_outputs_for_folds_it_lacks_are_refused(world, model):
    events, splits = world
    with pytest.raises(ValueError, match="with_person_folds"):
        train_sequence_model(events, splits.drop("fold"), LENDING_PACK, TINY, log=print)
    arrays = model.arrays(events, splits.head(3))
    with pytest.raises(ValueError, match="encoders for folds 0-1"):
        model.output_columns(arrays, np.array([0, 2, 1]))


def test_a_model_saved_with_one_encoder_before_cross_fitting_still_loads(world, model, tmp_path):
    """A champion registered before cross-fitting (`encoder/`, a scorer on its embedding) is
    scored as it was: one encoder, its embedding and probabilities under their old names."""
    events, splits = world
    model.save(tmp_path)
    (tmp_path / "encoders" / "0").rename(tmp_path / "encoder")
    shutil.rmtree(tmp_path / "encoders")
    old = SequenceModel.load(tmp_path)
    assert len(old.encoders) == 1
    assert old.output_names == [f"emb_{i}" for i in range(4)] + old.probability_names
    arrays = model.arrays(events, splits.head(20))
    alone = predict(model.encoders[0], arrays)["default_90d"].astype(np.float64)
    one = old.output_columns(arrays, old.folds_of(splits.head(20)["entity_id"]))
    np.testing.assert_array_equal(one["encoder_default_90d"], alone)


def test_a_saved_model_refuses_a_spec_that_codes_ids_differently_from_its_encoder(
    world, model, tmp_path
):
    events, splits = world
    model.save(tmp_path)
    loaded = SequenceModel.load(tmp_path)
    assert loaded.sequence_spec == model.sequence_spec
    assert all(torch.equal(v, state(model)[k]) for k, v in state(loaded).items())
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
    splits = with_person_folds(split_decisions(build_decisions(events, spec), spec))
    model, _ = train_sequence_model(events, splits, spec, TINY, log=lambda line: None)
    assert model.tasks == tuple(label.name for label in labels)
    columns = model.output_columns(
        model.arrays(events, splits.head(5)), splits.head(5)["fold"].to_numpy()
    )
    probabilities = [columns[name] for name in model.probability_names]
    assert len(probabilities) == n_labels
    assert all(((p >= 0) & (p <= 1)).all() for p in probabilities)


def test_sequences_built_by_parts_of_whole_entities_are_the_whole_builds_rows(world, tmp_path):
    events, splits = world
    table = str(tmp_path / "raw_events")
    events.with_columns(pl.col("ts").dt.date().alias("day")).write_delta(table)
    coding = SequenceSpec.fit(LENDING_PACK, events)
    data = EncoderData.of(events, splits, LENDING_PACK, coding, outlook_days=30, max_len=16, fold=0)
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
    held, _ = train_sequence_model(events, splits, LENDING_PACK, TINY, log=lambda line: None)
    read, _ = train_sequence_model(
        EventTable(table, 0), splits, LENDING_PACK, TINY, log=lambda line: None
    )
    assert read.sequence_spec == held.sequence_spec
    mine, theirs = state(held), state(read)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
