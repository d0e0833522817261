"""A small bank's dataset spec in its own column names: the landing zone's and sources' tests."""

import pytest

from eventml.schema import DatasetSpec


@pytest.fixture
def bank_spec() -> DatasetSpec:
    return DatasetSpec.from_dict(
        {
            "name": "bank",
            "source_start": "2025-01-01",
            "event_types": ["login", "transfer"],
            "categorical": ["channel"],
            "decision_event_types": ["transfer"],
            "columns": {"entity_id": "customer", "event_id": "id", "ts": "time", "event_type": "what", "amount": "eur"},
        }
    )
