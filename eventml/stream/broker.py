"""A source's events on a Redis stream, in the event contract's shape.

One stream per source (`<prefix>:events:<pack name>`). An entry is one event: a field per contract
column, by its canonical name (`entity_id`, `event_id`, `ts` as ISO 8601 with its offset,
`event_type`, `amount`, the pack's attributes), every value text, a missing value a missing
field. A user's producer appends entries the same way, from any language:

    XADD eventml:events:lending_sim * entity_id u42 event_id e-1 ts 2025-06-01T12:00:00Z \\
        event_type session

Consumers read through a consumer group: an entry delivered to a consumer stays pending until it
acknowledges it, and a consumer that restarts reads its pending entries again first
(`eventml.stream.consumer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

import polars as pl

from eventml.online_store.redis import connect

GROUP = "eventml"
ENTRY = "__entry"  # the column of a read batch that holds each entry's id
# Field layouts (names in order) a batch is made into columns by, one layout at a time; past
# this many, a producer orders its fields at random and the batch is read an entry at a time.
LAYOUTS = 32


def stream_version(entry_id: str | bytes) -> int:
    """An entry id (`<ms>-<seq>`) as one increasing integer: the version a landing commit
    records (`eventml.stream.consumer`)."""
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    if int(seq) >= 1_000_000:
        raise ValueError(f"stream entry {entry_id}: over a million entries in one millisecond")
    return int(ms) * 1_000_000 + int(seq)


class EventStream:
    def __init__(self, url: str, source: str, group: str = GROUP):
        """`url`: redis://host:port/db, with `?prefix=name` (`eventml.online_store.redis.connect`)."""
        self.client, prefix = connect(url, text=True)
        self.key, self.group = f"{prefix}:events:{source}", group
        # XREADGROUP's reply as hiredis parses it, in C, rather than made into a dict per entry
        # by redis-py (~13 µs an entry); `_columns` makes the columns. A script that made the
        # batch into JSON inside Redis cost Redis, the consumer's neighbour on a small machine,
        # 4 times what XREADGROUP itself does.
        self.client.response_callbacks.pop("XREADGROUP", None)

    def publish(self, events: Iterable[dict]) -> list[str]:
        """Append events (dicts of contract columns) in order; their entry ids."""
        with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(self.key, {k: _text(v) for k, v in event.items() if v is not None})
            return pipe.execute()

    def create_group(self) -> None:
        """The consumer group, reading from the stream's first entry (once; a no-op after)."""
        import redis

        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read(
        self, consumer: str, count: int, block_ms: int | None = None, pending: bool = False
    ) -> pl.DataFrame:
        """Up to `count` entries for `consumer`, in id order, as text columns (ENTRY, then a
        column per field any entry carries; null where an entry lacks it): its own pending ones
        (delivered before, not yet acknowledged) with `pending`, else new ones, waiting up to
        `block_ms` for them."""
        wait = ["BLOCK", block_ms] if block_ms and not pending else []
        reply = self.client.execute_command(
            "XREADGROUP", "GROUP", self.group, consumer, "COUNT", count, *wait,
            "STREAMS", self.key, "0" if pending else ">",
        )  # fmt: skip
        # RESP3 replies {stream: entries}, RESP2 [[stream, entries]]; nothing new: None.
        streams = reply.values() if isinstance(reply, dict) else [e for _, e in reply or []]
        return _columns([entry for entries in streams for entry in entries])

    def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.client.xack(self.key, self.group, *entry_ids)

    def backlog(self) -> dict:
        """The group's entries not yet delivered (`lag`) and delivered but not acknowledged
        (`pending`)."""
        if not self.client.exists(self.key):
            return {"lag": 0, "pending": 0}
        for group in self.client.xinfo_groups(self.key):
            if group["name"] == self.group:
                return {"lag": group.get("lag") or 0, "pending": group["pending"]}
        return {"lag": self.client.xlen(self.key), "pending": 0}

    def pending_by_consumer(self) -> dict[str, int]:
        """Entries delivered to each consumer and not yet acknowledged by it."""
        import redis

        try:
            summary = self.client.xpending(self.key, self.group)
        except redis.ResponseError as error:  # no stream or no group yet: nothing delivered
            if "NOGROUP" in str(error):
                return {}
            raise
        return {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}

    def record_stats(self, consumer: str, stats: dict) -> None:
        """How a consumer's latest batch went (`eventml.stream.consumer.Consumed.stats`)."""
        self.client.hset(f"{self.key}:consumers", consumer, json.dumps(stats))

    def consumer_stats(self) -> dict[str, dict]:
        """Each consumer's latest batch, by consumer name (what `record_stats` was given)."""
        found = self.client.hgetall(f"{self.key}:consumers")
        return {name: json.loads(stats) for name, stats in sorted(found.items())}


def _columns(entries: list) -> pl.DataFrame:
    """Entries as XREADGROUP replies them ([id, [field, value, ...]]; a deleted entry's fields
    None) as text columns: ENTRY, then a column per field any entry carries, null where an entry
    lacks it, in the entries' order. A producer writes the fields of an event type in one order,
    so a batch holds a few layouts of fields, each made into columns at once."""
    if not entries:
        return pl.DataFrame(schema={ENTRY: pl.String})
    rows_of: dict[tuple, list[int]] = {}
    for i, (_, fields) in enumerate(entries):
        rows_of.setdefault(tuple(fields[::2]) if fields else (), []).append(i)
    if len(rows_of) > LAYOUTS:  # fields in no fixed order (a map's iteration): a dict per entry
        rows = [{ENTRY: i, **dict(zip(f[::2], f[1::2]))} if f else {ENTRY: i} for i, f in entries]
        names = dict.fromkeys(name for row in rows for name in row)
        return pl.from_dicts(rows, schema=dict.fromkeys(names, pl.String))
    parts = []
    for names, rows in rows_of.items():
        values = [entries[i][1][1::2] for i in rows] if names else []
        columns = {ENTRY: [entries[i][0] for i in rows], **dict(zip(names, zip(*values)))}
        parts.append(
            pl.DataFrame(columns, schema=dict.fromkeys(columns, pl.String))
            .with_columns(pl.Series("__row", rows, dtype=pl.UInt32))
        )  # fmt: skip
    return pl.concat(parts, how="diagonal").sort("__row").drop("__row")


def _text(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)
