"""Publishing a built-in world's days to its stream as they happen, on an accelerated clock,
and waiting until the consumers have taken everything published (`make stream-produce`, and
`make advance` when the deployment's source is the stream)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import polars as pl

from eventml.stream.broker import EventStream


def publish_days(
    stream: EventStream, days: Iterable[tuple[int, pl.DataFrame]], seconds_per_day: float,
    log: Callable[[str], None] = print,
) -> int:  # fmt: skip
    """Each day's events in time order, spread over `seconds_per_day` (0: as fast as possible);
    the number of events published."""
    sent = 0
    for day, events in days:
        started, rows = time.monotonic(), events.sort("ts").to_dicts()
        step = max(1, len(rows) // 20)  # twenty sends a day, each when its time comes
        for i in range(0, len(rows), step):
            stream.publish(rows[i : i + step])
            wait = started + seconds_per_day * (i + step) / len(rows) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        sent += len(rows)
        log(f"day {day}: {len(rows):,} events published")
    return sent


def wait_until_taken(stream: EventStream, timeout: float = 600.0,
                     log: Callable[[str], None] = print) -> None:  # fmt: skip
    """Return once every entry published has been delivered and acknowledged (landed); say so
    when nothing moves, which is a consumer not running."""
    deadline, last, quiet_since = time.monotonic() + timeout, None, time.monotonic()
    while (backlog := stream.backlog()) != {"lag": 0, "pending": 0}:
        if backlog != last:
            last, quiet_since = backlog, time.monotonic()
        elif time.monotonic() - quiet_since > 10:
            log(f"waiting for a consumer: {backlog['lag']:,} entries not yet taken (start one: "
                "`make stream`)")  # fmt: skip
            quiet_since = time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the stream's consumers did not take it within {timeout} s: {backlog}"
            )
        time.sleep(0.2)
