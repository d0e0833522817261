"""The benchmarks are not tests, but they must keep up with the code they measure: each one
imports and has a `main`, so a renamed module or a moved name fails here, not on the day
someone runs the bench."""

import importlib.util
from pathlib import Path

import pytest

BENCHES = sorted((Path(__file__).parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_every_bench_imports_and_has_a_main(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
