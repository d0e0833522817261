"""A state folder serves one dataset pack: its UI's code location is named after the pack, and
another pack is refused with the way out, so two sources' tables and champions never mix. Its
Dagster instance runs the CPU-heavy steps a budgeted number at a time."""

import dagster as dg
import pytest
import yaml

from eventml.home import StateHome
from resources.compute import CPU_POOL
from resources.state import HomeHoldsAnotherPack, dagster_home, prepare


@pytest.fixture
def home(tmp_path, monkeypatch) -> StateHome:
    monkeypatch.delenv("EVENTML_POSTGRES_URL", raising=False)
    monkeypatch.delenv("EVENTML_PACK", raising=False)
    return StateHome(tmp_path / "home")


def test_the_ui_workspace_names_the_code_location_after_the_pack(home, monkeypatch):
    monkeypatch.setenv("EVENTML_PACK", "cards")
    lines = prepare(home)
    workspace = yaml.safe_load((dagster_home(home) / "workspace.yaml").read_text())
    (location,) = workspace["load_from"]
    assert location["python_module"]["location_name"] == "cards_sim"
    assert any("pack cards_sim" in line for line in lines)


def test_a_home_set_up_for_one_pack_refuses_another(home, monkeypatch):
    prepare(home)  # the default pack: the lending world
    assert prepare(home)  # the same pack again is fine
    monkeypatch.setenv("EVENTML_PACK", "cards")
    with pytest.raises(HomeHoldsAnotherPack, match="'lending_sim'.*'cards_sim'.*own EVENTML_HOME"):
        prepare(home)


@pytest.mark.parametrize("steps", [None, "2"])
def test_the_instance_runs_as_many_heavy_steps_at_once_as_the_thread_budget_is_split_into(
    home, monkeypatch, steps
):
    if steps:
        monkeypatch.setenv("EVENTML_STEPS_AT_ONCE", steps)
    else:
        monkeypatch.delenv("EVENTML_STEPS_AT_ONCE", raising=False)
    prepare(home)
    with dg.DagsterInstance.from_config(str(dagster_home(home))) as instance:
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.global_op_concurrency_default_limit == int(steps or 1)


def test_the_set_up_step_frees_the_pool_slots_of_runs_that_ended_holding_them(home):
    prepare(home)
    with dg.DagsterInstance.from_config(str(dagster_home(home))) as instance:
        ended = instance.add_run(
            dg.DagsterRun(job_name="retrain_job", status=dg.DagsterRunStatus.FAILURE)
        )
        running = instance.add_run(
            dg.DagsterRun(job_name="retrain_job", status=dg.DagsterRunStatus.STARTED)
        )
        storage = instance.event_log_storage
        for run in (ended, running):  # a run whose process was killed never gave its slot back
            storage.claim_concurrency_slot(CPU_POOL, run.run_id, "sequence_encoder")
        assert storage.get_concurrency_run_ids() == {ended.run_id, running.run_id}
    prepare(home)
    with dg.DagsterInstance.from_config(str(dagster_home(home))) as instance:
        assert instance.event_log_storage.get_concurrency_run_ids() == {running.run_id}
