"""The online store on Redis, the production counterpart of SQLite: the same packed histories
(`packing`), one key per entity, so a read of a batch is one round trip.

Keys, under a prefix (the URL's `?prefix=`, default `eventml`):

    <p>:history:<entity>        the entity's events, packed (a string)
    <p>:tail:<entity>           list: the packed events of each `write` since the history was
                                last packed (`<p>:tailed`: the entities with one)
    <p>:first, <p>:events       hashes: entity -> its first event (µs), its number of events in
                                its packed history
    <p>:last                    sorted set: entity scored by its last event (µs, exact in a double)
    <p>:activity:<column>:<key> the key's activity rows, packed
    <p>:activity-day:<day>      set of "<column>\\x1f<key>" with activity on that day
    <p>:reference:<name>        hash: key -> its reference rows, packed
    <p>:version                 incremented by every write
    <p>:layout                  this layout's number, `LAYOUT`

Every write is atomic, so a reader sees a batch of events (a day, a re-published range, a
stream's batch) whole or not at all. `write`, the stream's path, appends: one script call adds
each entity's new events as a segment of its tail, reading nothing, so its cost is the new events'
and not the histories'. A read merges the tail into the history (the last copy of an event id
wins, as in SQLite); once a tail holds `TAIL_LIMIT` segments the write that made it so packs it
into the history. Everything else (`replace_between`, packing a tail) is one MULTI/EXEC:
writers read what they re-pack under WATCH of `<p>:version`, which every write increments, and
retry when another writer committed in between: optimistic, and never a lock left behind by a
killed writer. A transaction is held in memory until EXEC: a backfill that re-publishes every
entity holds the whole store once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import polars as pl

from eventml.features import ACTIVITY_SCHEMA
from eventml.online_store.packing import (
    arriving,
    chunks,
    day_number,
    inside,
    latest_bounds,
    merged,
    pack,
    packed_histories,
    packed_references,
    unpacked,
    us,
)
from eventml.schema import DatasetSpec

_SEP = "\x1f"
# The key layout above. A reader of another layout would miss events (one before tails reads no
# tail), so a store refuses a client of another layout: the Bento is rebuilt with this code.
LAYOUT = "2"
# Segments a tail holds before the write that adds one packs them into the history: a read
# merges at most this many, and a history is re-packed once per this many writes of it.
TAIL_LIMIT = 16
# ARGV: the prefix, then per entity its id, its new events packed, and their first and last
# instants (µs); per entity, its tail's length after the append.
_APPEND = """
local p, lengths = ARGV[1], {}
for i = 2, #ARGV, 4 do
  local e, first = ARGV[i], ARGV[i + 2]
  lengths[#lengths + 1] = redis.call('RPUSH', p .. ':tail:' .. e, ARGV[i + 1])
  local known = redis.call('HGET', p .. ':first', e)
  if not known or tonumber(first) < tonumber(known) then
    redis.call('HSET', p .. ':first', e, first)
  end
  redis.call('ZADD', p .. ':last', 'GT', ARGV[i + 3], e)
  redis.call('SADD', p .. ':tailed', e)
end
redis.call('INCR', p .. ':version')
return lengths
"""


def connect(url: str, text: bool = False):
    """A client and the key prefix of `url`: redis://host:port/db, with `?prefix=name` to keep
    several stores or deployments in one database (default `eventml`). With `text`, replies
    arrive decoded (by hiredis, in C) as str rather than bytes."""
    import redis

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["eventml"])[0]
    plain = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return redis.Redis.from_url(plain, decode_responses=text), prefix


class RedisOnlineStore:
    def __init__(self, url: str, spec: DatasetSpec):
        """`url`: see `connect`."""
        self.url = url
        self.client, self.prefix = connect(url)
        self.schema = spec.event_schema()
        self._empty = pl.DataFrame(schema=self.schema)
        self._append = self.client.register_script(_APPEND)
        self.client.set(self._key("layout"), LAYOUT, nx=True)
        if (layout := self.client.get(self._key("layout")).decode()) != LAYOUT:
            raise ValueError(
                f"the online store at {url} has key layout {layout}, and this eventml reads "
                f"layout {LAYOUT}: serve a Bento built with the eventml that wrote it (rebuild "
                "risk_service_bento), or publish the store again under a new ?prefix="
            )

    @property
    def location(self) -> str:
        return self.url

    def _key(self, *parts: str) -> str:
        return ":".join([self.prefix, *parts])

    def _transaction(self, plan: Callable) -> int:
        """Run `plan(pipe)`, which reads through `pipe` and returns (queue, result); `queue(pipe)`
        then adds its writes to one MULTI/EXEC with the version bump. Retried from the reads
        when another writer committed since they began."""

        def attempt(pipe) -> int:
            queue, result = plan(pipe)
            pipe.multi()
            queue(pipe)
            pipe.incr(self._key("version"))
            return result

        return self.client.transaction(attempt, self._key("version"), value_from_callable=True)

    # ------------------------------------------------------------ histories

    def _fetch(self, entity_ids: list[str]) -> dict[str, bytes | pl.DataFrame]:
        """Each entity's stored events: its packed history, or with a tail, the history and the
        tail merged (the last copy of an event id wins). Under a writer's WATCH, these reads may
        take their own connection: any write in between bumps the watched version."""
        found: dict[str, bytes | pl.DataFrame] = {}
        tails: dict[str, list[bytes]] = {}
        for chunk in chunks(entity_ids):
            with self.client.pipeline(transaction=False) as pipe:
                pipe.mget([self._key("history", e) for e in chunk])
                for e in chunk:
                    pipe.lrange(self._key("tail", e), 0, -1)
                packed, *segments = pipe.execute()
            for e, history, tail in zip(chunk, packed, segments):
                if tail:
                    tails[e] = [history, *tail] if history is not None else tail
                elif history is not None:
                    found[e] = history
        if tails:
            parts = [pl.read_ipc_stream(part) for blobs in tails.values() for part in blobs]
            folded = merged(pl.concat(parts), self._empty)
            found |= {
                e: rows for (e,), rows in folded.partition_by("entity_id", as_dict=True).items()
            }
        return found

    def _stored(self, entity_ids: list[str]) -> pl.DataFrame:
        return unpacked(self._fetch(entity_ids), entity_ids, None, self._empty)

    def _touched_between(self, reader, start: datetime, end: datetime) -> list[str]:
        """Entities with a stored event in [start, end) possible: last >= start and first < end."""
        candidates = [
            e.decode() for e in reader.zrangebyscore(self._key("last"), us(start), "+inf")
        ]
        firsts = reader.hmget(self._key("first"), candidates) if candidates else []
        return sorted(e for e, f in zip(candidates, firsts) if int(f) < us(end))

    def _queue_histories(self, touched: list[str], final: pl.DataFrame) -> Callable:
        """The writes that leave `touched` entities holding exactly their rows of `final` (read
        with their tails), packed, with no tail."""
        rows = packed_histories(final)
        gone = sorted(set(touched) - {row[0] for row in rows})

        def queue(pipe) -> None:
            if touched:
                pipe.delete(*[self._key("tail", e) for e in touched])
                pipe.srem(self._key("tailed"), *touched)
            if rows:
                pipe.mset({self._key("history", e): packed for e, _, _, _, packed in rows})
                pipe.hset(self._key("first"), mapping={e: first for e, _, first, _, _ in rows})
                pipe.hset(self._key("events"), mapping={e: n for e, n, _, _, _ in rows})
                pipe.zadd(self._key("last"), {e: last for e, _, _, last, _ in rows})
            if gone:
                pipe.delete(*[self._key("history", e) for e in gone])
                pipe.hdel(self._key("first"), *gone)
                pipe.hdel(self._key("events"), *gone)
                pipe.zrem(self._key("last"), *gone)

        return queue

    def write(self, events: pl.DataFrame) -> int:
        if events.height == 0:
            return 0
        new = arriving(events, self.schema).sort("entity_id", "ts", "event_id")
        rows = packed_histories(new)
        args: list = [self.prefix]
        for entity_id, _, first, last, packed in rows:
            args += [entity_id, packed, first, last]
        lengths = self._append(args=args)
        if full := [row[0] for row, n in zip(rows, lengths) if n >= TAIL_LIMIT]:
            self._pack_tails(full)
        return events.height

    def _pack_tails(self, entity_ids: list[str]) -> None:
        """Merge these entities' tails into their packed histories."""
        for chunk in chunks(sorted(entity_ids)):
            self._transaction(lambda pipe, c=chunk: (self._queue_histories(c, self._stored(c)), 0))

    def delete_between(self, start: datetime, end: datetime) -> int:
        return self.replace_between(start, end, self._empty)

    def replace_between(
        self,
        start: datetime | None,
        end: datetime | None,
        events: pl.DataFrame,
        activity: pl.DataFrame | None = None,
        references: dict[str, pl.DataFrame] | None = None,
    ) -> int:
        new = arriving(events, self.schema)
        ranged = start is not None

        def plan(pipe):
            touched = self._touched_between(pipe, start, end) if ranged else []
            touched = sorted(set(touched) | set(new["entity_id"].unique().to_list()))
            stored = self._stored(touched)
            kept, changed = stored, touched  # a write: every history read takes new events
            if ranged:
                kept = stored.filter(~inside(start, end))
                # Histories that span the range without an event in it are not re-written.
                removed = stored.join(kept, on=["entity_id", "event_id"], how="anti")
                changed = sorted(set(removed["entity_id"]) | set(new["entity_id"]))
            final = merged(kept.filter(pl.col("entity_id").is_in(changed)) if ranged else kept, new)
            queues = [self._queue_histories(changed, final)]
            if activity is not None:
                queues.append(self._plan_activity(pipe, activity, start, end))
            for name, rows in (references or {}).items():
                queues.append(self._queue_references(name, rows))
            return (lambda p: [q(p) for q in queues]), stored.height - kept.height

        return self._transaction(plan)

    def history(
        self, entity_id: str, before: datetime | None = None, limit: int | None = None
    ) -> pl.DataFrame:
        bound = None if before is None else [us(before)]
        events = unpacked(self._fetch([entity_id]), [entity_id], bound, self._empty)
        return events if limit is None else events.tail(int(limit))

    def histories(
        self, entity_ids: list[str], before: list[datetime | None] | None = None
    ) -> pl.DataFrame:
        asked, bounds = latest_bounds(entity_ids, before)
        return unpacked(self._fetch(asked), asked, bounds, self._empty)

    # ------------------------------------------------------------ keyed activity

    def _activity_of(self, reader, members: list[str]) -> pl.DataFrame:
        """The stored activity rows of these "<column>\\x1f<key>" members."""
        frames = []
        for chunk in chunks(members):
            values = reader.mget([self._key("activity", *m.split(_SEP, 1)) for m in chunk])
            frames += [pl.read_ipc_stream(v) for v in values if v is not None]
        return pl.concat(frames) if frames else pl.DataFrame(schema=ACTIVITY_SCHEMA)

    def _plan_activity(
        self, reader, activity: pl.DataFrame, start: datetime | None, end: datetime | None
    ) -> Callable:
        """Reads, and returns the writes that put `activity` over the stored rows (by key column,
        key, day and measure), first removing the days of [start, end) when given."""
        activity = activity.select(list(ACTIVITY_SCHEMA)).cast(ACTIVITY_SCHEMA)
        days = range(day_number(start.date()), day_number(end.date())) if start else range(0)
        day_sets = [self._key("activity-day", str(d)) for d in days]
        replaced = {m.decode() for m in reader.sunion(day_sets)} if day_sets else set()
        arriving_keys = {
            f"{c}{_SEP}{k}" for c, k in activity.select("key_column", "key").unique().iter_rows()
        }
        members = sorted(replaced | arriving_keys)
        stored = self._activity_of(reader, members)
        if days:
            day = (pl.col("day") - pl.date(1970, 1, 1)).dt.total_days()
            stored = stored.filter(~day.is_between(days.start, days.stop, closed="left"))
        final = pl.concat([stored, activity]).unique(
            ["key_column", "key", "day", "measure"], keep="last", maintain_order=True
        )
        member = pl.concat_str("key_column", "key", separator=_SEP)
        parts = final.with_columns(member.alias("member")).partition_by("member", as_dict=True)
        packed = {m: pack(p.drop("member").sort("day", "measure")) for (m,), p in parts.items()}
        by_day = final.select(member.alias("member"), "day").unique()

        def queue(pipe) -> None:
            if day_sets:
                pipe.delete(*day_sets)
            gone = [m for m in members if m not in packed]
            if gone:
                pipe.delete(*[self._key("activity", *m.split(_SEP, 1)) for m in gone])
            if packed:
                pipe.mset({self._key("activity", *m.split(_SEP, 1)): v for m, v in packed.items()})
            for (day,), rows in by_day.partition_by("day", as_dict=True).items():
                pipe.sadd(self._key("activity-day", str(day_number(day))), *rows["member"])

        return queue

    def write_activity(self, activity: pl.DataFrame) -> int:
        self._transaction(lambda pipe: (self._plan_activity(pipe, activity, None, None), 0))
        return activity.height

    def activity(self, keys: dict[str, list[str]]) -> pl.DataFrame:
        members = sorted(
            {
                f"{column}{_SEP}{v}"
                for column, values in keys.items()
                for v in values
                if v is not None
            }
        )
        return self._activity_of(self.client, members).sort("key_column", "key", "day", "measure")

    # ------------------------------------------------------------ reference tables

    def _queue_references(self, name: str, rows: pl.DataFrame) -> Callable:
        packed = dict(packed_references(rows))

        def queue(pipe) -> None:
            pipe.delete(self._key("reference", name))
            if packed:
                pipe.hset(self._key("reference", name), mapping=packed)

        return queue

    def write_references(self, name: str, rows: pl.DataFrame) -> int:
        self._transaction(lambda pipe: (self._queue_references(name, rows), 0))
        return rows.height

    def references(self, name: str, keys: list[str]) -> pl.DataFrame | None:
        asked = sorted({k for k in keys if k is not None})
        values = self.client.hmget(self._key("reference", name), asked) if asked else []
        frames = [pl.read_ipc_stream(v) for v in values if v is not None]
        return pl.concat(frames) if frames else None

    def stats(self) -> dict:
        # Exact counts: the tails are packed first (a copy of an event id is counted once).
        self._pack_tails([e.decode() for e in self.client.smembers(self._key("tailed"))])
        last = self.client.zrevrange(self._key("last"), 0, 0, withscores=True)
        counts = self.client.hvals(self._key("events"))
        return {
            "events": sum(int(n) for n in counts),
            "entities": len(counts),
            "latest_event": datetime.fromtimestamp(last[0][1] / 1e6, UTC).isoformat()
            if last
            else None,
        }
