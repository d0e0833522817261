"""The compute resource from the environment: a misspelt backend is named, with what to set."""

import pytest

from resources.compute import Compute


def test_the_environment_picks_the_backend_and_a_misspelt_one_says_what_to_set(monkeypatch):
    monkeypatch.setenv("EVENTML_COMPUTE", "ray")
    monkeypatch.setenv("EVENTML_RAY_SHARDS", "16")
    assert Compute.configured().backend == "ray" and Compute.configured().shards == 16
    monkeypatch.setenv("EVENTML_COMPUTE", "Ray-cluster")
    with pytest.raises(ValueError, match="EVENTML_COMPUTE='Ray-cluster': set it to 'ray'"):
        Compute.configured()
