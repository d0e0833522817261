"""A simulated world's calendar: day 0 is the config's `start` (midnight UTC)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Protocol


class HasStart(Protocol):
    start: str  # ISO date of day 0


def date_of(config: HasStart, day: int) -> date:
    return date.fromisoformat(config.start) + timedelta(days=day)


def day_of(config: HasStart, ts_or_date: datetime | date | str) -> int:
    """The world day of a timestamp (UTC), date, or ISO string."""
    if isinstance(ts_or_date, str):
        ts_or_date = datetime.fromisoformat(ts_or_date)
    if isinstance(ts_or_date, datetime):
        aware = ts_or_date if ts_or_date.tzinfo else ts_or_date.replace(tzinfo=UTC)
        ts_or_date = aware.astimezone(UTC).date()
    return (ts_or_date - date.fromisoformat(config.start)).days
