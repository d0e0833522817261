"""A small simulated world and private tables for Dagster runs in tests."""

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from resources.delta import DeltaTables
from resources.sources import EventSource


@pytest.fixture
def tables(tmp_path) -> DeltaTables:
    return DeltaTables(root_uri=str(tmp_path / "tables"))


@pytest.fixture
def small_world() -> EventSource:
    return EventSource(n_users=400, fault_rate=0.01)


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def range_tags():
    """Tags that make one run cover a range of days (a single-run backfill)."""
    return lambda first, last: {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


@pytest.fixture
def resources_for():
    """The code location's resources, pointed at the given tables and event source."""
    return lambda tables, source: {"tables": tables, "io_manager": tables.io_manager(), "event_source": source}
