"""The stream consumer: a source's events from its Redis stream into the online store, and landed
durably in Delta exactly once, whatever is killed when.

Each batch of entries is validated against the source's contract (`eventml.validation`, as a
batch file is: bad events go to the rejects table with their reason; so does a later copy of an
event id an earlier entry carried, `duplicate_event_id`, as a repeated row of a day is), then:

1. the clean events are written to the online store (idempotent: the store keys events by
   entity and event_id, so writing a batch again changes nothing);
2. at the same time, the clean events are appended to `stream_events` and the rejects to
   `stream_rejects`, each in one Delta commit that records the batch's last entry as the table's
   application transaction version (Delta's `txn` action, app id `stream:<stream key>`);
3. once both are done, the entries are acknowledged, in the background while the next batch is
   validated (Redis, on the other core, works on one batch while this process works on another).

A consumer killed anywhere restarts on its pending entries (delivered, never acknowledged). An
entry at or below a table's recorded version is already in that table and is not appended again;
the rest are. So every entry lands in each table once: a commit holds a batch wholly or not at
all, and the version says which. Each consumer of the group records its own version (app id
`stream:<stream key>:<consumer name>`): the entries one consumer is given, and so commits, have
increasing ids, whatever the others do. A consumer keeps its name across restarts (its pending
entries are delivered to that name only), so several run side by side as `consumer-1`,
`consumer-2`, ...

Every row lands on a day of the pack's partitions, as in batch ingest: a clean event on its own
(an event outside the partitions is rejected, `outside_partitions`), a reject on its own day if
its time parses to one, else on the newest event day this consumer has landed. The `stream`
event source (`resources.sources`) reads a day back from the two tables.

After each batch the consumer records how it went in the stream's `<key>:consumers` hash
(`EventStream.consumer_stats`): throughput, and freshness, the time from each entry's publication
(its id is the broker's clock) until the online store served it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from eventml.online_store import OnlineStore
from eventml.pack import DatasetPack
from eventml.sources import DAY
from eventml.stream.broker import ENTRY, EventStream, stream_version
from eventml.stream.landed import landed_table, watermark
from eventml.validation import parse_ts, validate

# How long the first entry of an event id is remembered: a copy sent again later than this is
# not recognised (an at-least-once producer retries within minutes).
DEDUP_DAYS = 30
# ARGV: the TTL, the number of events n, then n day key numbers (1-based in KEYS), n event ids
# and n entry ids. Per event: record the entry as the event id's first copy unless one is
# recorded; 1 where the recorded first copy is another entry. A day's events are looked up and
# recorded by HMGET and HSET of up to 2,000 at a time (Lua's unpack takes ~8,000 values): a
# command per event cost Redis more than the rest of the batch. Validation has kept one row per
# event id, so the ids of one call are distinct.
_FIRST_COPIES = """
local n, later, rows_of = tonumber(ARGV[2]), {}, {}
for i = 1, n do
  local k = tonumber(ARGV[2 + i])
  rows_of[k] = rows_of[k] or {}
  table.insert(rows_of[k], i)
end
for k, rows in pairs(rows_of) do
  local key = KEYS[k]
  for from = 1, #rows, 2000 do
    local upto, ids, fresh = math.min(from + 1999, #rows), {}, {}
    for j = from, upto do ids[#ids + 1] = ARGV[2 + n + rows[j]] end
    local known = redis.call('HMGET', key, unpack(ids))
    for j = from, upto do
      local i = rows[j]
      local event_id, entry = ARGV[2 + n + i], ARGV[2 + 2 * n + i]
      local first = known[j - from + 1]
      if first then
        later[i] = first == entry and 0 or 1
      else
        fresh[#fresh + 1] = event_id
        fresh[#fresh + 1] = entry
        later[i] = 0
      end
    end
    if #fresh > 0 then redis.call('HSET', key, unpack(fresh)) end
  end
  redis.call('EXPIRE', key, ARGV[1])
end
return later
"""
# The most entries one batch takes: a live stream's batches hold what arrived since the last
# (a few), a backlog's are large, so each batch's fixed costs (two Delta commits, a transaction)
# are spread over many events when the consumer is behind.
BATCH = 20_000


@dataclass
class Consumed:
    """What one batch did."""

    entries: int = 0
    clean: int = 0
    rejected: int = 0
    landed: int = 0  # rows appended to the two tables (0 for a batch landed before a crash)
    # Per stage (validate, online_store, delta); the online store's write overlaps the commits.
    seconds: dict[str, float] = field(default_factory=dict)
    busy_s: float = 0.0  # the batch from its validation to its last commit
    # Publication to servable (the online store holds it), per entry of the batch: ms.
    freshness_p50_ms: float = 0.0
    freshness_max_ms: float = 0.0
    watermark: str = ""  # the newest event time landed so far, ISO 8601

    def stats(self) -> dict:
        """What `EventStream.consumer_stats` reports for the batch."""
        busy = self.busy_s
        return {**asdict(self), "events_per_s": round(self.entries / busy, 1) if busy else 0.0,
                "at": datetime.now(UTC).isoformat(timespec="milliseconds")}  # fmt: skip


class StreamConsumer:
    def __init__(
        self,
        stream: EventStream,
        spec: DatasetPack,
        store: OnlineStore,
        events_uri: str,
        rejects_uri: str,
        name: str = "consumer-1",
    ):
        self.stream, self.spec, self.store, self.name = stream, spec, store, name
        self.events_uri, self.rejects_uri = events_uri, rejects_uri
        self.app_id = f"stream:{stream.key}:{name}"
        self._first_copies = stream.client.register_script(_FIRST_COPIES)
        # Each table, kept open (a commit through an open table reads only the log's new
        # entries), and the last entry it recorded for this consumer: read once, then kept as
        # this process commits (a consumer's name is its own: no other process commits under it).
        self._tables = {uri: landed_table(uri) for uri in (events_uri, rejects_uri)}
        self._landed = {uri: _committed_version(t, self.app_id) for uri, t in self._tables.items()}
        self.days = (spec.partition_range.start, spec.partition_range.end)
        self.watermark: datetime | None = watermark(events_uri)
        stream.create_group()
        self._recovering = True  # until this consumer's pending entries are all consumed
        # Redis calls made beside this thread's work: the next batch's read, the online store's
        # write, the acknowledgement.
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stream")
        self._next: Future | None = None
        self._acked: Future | None = None

    def step(self, count: int = BATCH, block_ms: int = 200) -> Consumed:
        """One batch: after a (re)start, this consumer's pending entries until none are left;
        then new ones. Behind a backlog, the next batch is read while this one is consumed, and
        the last one's acknowledgement is on its way: a consumer killed holds up to three
        batches pending, which its restart consumes first, in id order, as any other."""
        if self._recovering:
            self._settle()  # else the batch just consumed would still be pending
            entries = self.stream.read(self.name, count, pending=True)
            if not entries.is_empty():
                return self.consume(entries)
            self._recovering = False
        if self._next is not None:
            entries, self._next = self._next.result(), None
        else:
            entries = self.stream.read(self.name, count, block_ms=block_ms)
        # Behind (a full batch), the next batch is read while this one is consumed. Not when
        # caught up: a read sent at once would take the first few events to arrive, and a
        # batch's fixed costs would be paid twice as often.
        behind = entries.height == count
        try:
            done = self.consume(
                entries, read_next=partial(self._read_next, count) if behind else None
            )
        except BaseException:
            # Whatever this batch landed, its entries stay pending: they, not newer ones, come
            # next (a newer batch would move the tables' versions past them).
            self._recovering, self._next = True, None
            raise
        if not behind:
            self._settle()  # caught up: a step returns with its batch acknowledged
        return done

    def _settle(self) -> None:
        """Wait until the last batch consumed is acknowledged (raising if that failed)."""
        acked, self._acked = self._acked, None
        if acked is not None:
            acked.result()

    def _read_next(self, count: int) -> None:
        self._next = self._background.submit(self.stream.read, self.name, count)

    def consume(
        self, entries: pl.DataFrame, read_next: Callable[[], None] | None = None
    ) -> Consumed:
        """One batch read by `EventStream.read`; its acknowledgement is sent in the background.
        `read_next` is called once the batch's first-copy check is done: Redis runs one call at a
        time, and a read of the next batch sent sooner would hold that check up."""
        done = Consumed(entries=entries.height)
        if entries.is_empty():
            return done
        started = time.perf_counter()
        ids = entries[ENTRY].to_list()
        sources = (pl.lit(f"{self.stream.key}/") + entries[ENTRY]).alias("source")
        checked = validate(
            entries.drop(ENTRY), self.spec, source=entries.select(sources).to_series(),
            days=self.days,
        )  # fmt: skip
        # Validation keeps the entries' order, and a reject names its entry: the clean rows are
        # the other entries, in order.
        rejected = set(checked.rejects["source"].str.split("/").list.last())
        clean_ids = [i for i in ids if i not in rejected]
        again = pl.Series(self._later_copies(checked.clean, clean_ids), dtype=pl.Boolean)
        clean = checked.clean.filter(~again)
        rejects = pl.concat([checked.rejects, self._as_rejects(checked.clean.filter(again),
                            [i for i, a in zip(clean_ids, again) if a])])  # fmt: skip
        done.clean, done.rejected = clean.height, rejects.height
        done.seconds["validate"] = time.perf_counter() - started
        if read_next:
            read_next()

        storing = self._background.submit(self._serve, clean)
        landing = time.perf_counter()

        first, batch = stream_version(ids[0]), stream_version(ids[-1])  # delivered in id order
        clean_ids = [i for i, a in zip(clean_ids, again) if not a]
        reject_ids = rejects["source"].str.split("/").list.last().to_list()
        if clean.height:
            self.watermark = max(clean["ts"].max(), self.watermark or clean["ts"].max())
        clean = clean.with_columns(pl.col("ts").dt.date().alias(DAY))
        rejects = self._placed(rejects)
        done.landed += self._land(clean, clean_ids, self.events_uri, first, batch)
        done.landed += self._land(rejects, reject_ids, self.rejects_uri, first, batch)
        done.seconds["delta"] = time.perf_counter() - landing
        served_ms, done.seconds["online_store"] = storing.result()
        waited = pl.Series([served_ms - int(i.split("-")[0]) for i in ids])
        done.freshness_p50_ms, done.freshness_max_ms = waited.median(), waited.max()

        # Only after both: an entry acknowledged is in the store and landed. A consumer killed
        # before the acknowledgement is sent gets the batch again, which changes nothing.
        self._settle()  # the last batch's, long done: its error, if any, is raised here
        self._acked = self._background.submit(self.stream.ack, ids)
        done.busy_s = time.perf_counter() - started
        done.watermark = self.watermark.isoformat() if self.watermark else ""
        self.stream.record_stats(self.name, done.stats())
        return done

    def _serve(self, clean: pl.DataFrame) -> tuple[float, float]:
        """Write the clean events to the online store: when they were servable (epoch ms), and
        the seconds it took."""
        started = time.perf_counter()
        self.store.write(clean)
        return time.time() * 1e3, time.perf_counter() - started

    def _placed(self, rejects: pl.DataFrame) -> pl.DataFrame:
        """The rejects, each on a partition day: its own if its time parses to one, else the
        newest event day landed (the partitions' first before any)."""
        first, end = self.days
        fallback = self.watermark.date() if self.watermark else first
        own = parse_ts(pl.col("ts"), pl.String(), self.spec).dt.date()
        inside = (own >= first) & (own < end)
        return rejects.with_columns(pl.when(inside).then(own).otherwise(fallback).alias(DAY))

    def _later_copies(self, clean: pl.DataFrame, entry_ids: list[str]) -> list[bool]:
        """Which clean rows repeat an event id an earlier entry carried (an at-least-once
        producer sending again): the first entry of each event id is recorded (per event day,
        kept for `DEDUP_DAYS`), so an entry delivered again is still its own first copy. One
        script call per batch: a command per event cost more than the rest of the batch."""
        if clean.height == 0:
            return []
        days = clean["ts"].dt.date()
        keys = [f"{self.stream.key}:first:{day}" for day in days.unique().sort().cast(pl.String)]
        # The rows' key numbers (1-based, KEYS' order), event ids and entry ids as three lists
        # one after the other: joined in C, where a triple per row built in Python cost as much
        # as Redis' work on them.
        args = [DEDUP_DAYS * 86_400, clean.height, *days.rank("dense").cast(pl.Int64).to_list(),
                *clean["event_id"].to_list(), *entry_ids]  # fmt: skip
        return [bool(again) for again in self._first_copies(keys=keys, args=args)]

    def _as_rejects(self, rows: pl.DataFrame, entry_ids: list[str]) -> pl.DataFrame:
        """Clean rows rejected as later copies, in the rejects' schema."""
        return rows.select(
            *[pl.col(c).cast(pl.String) for c in self.spec.event_schema()],
            pl.lit("duplicate_event_id").alias("reason"),
            pl.lit("event_id").alias("field"),
            pl.Series("source", [f"{self.stream.key}/{i}" for i in entry_ids], dtype=pl.String),
        )

    def _land(self, rows: pl.DataFrame, entry_ids: list[str], uri: str, first: int,
              batch: int) -> int:  # fmt: skip
        """Append the rows (one per entry of `entry_ids`) the table does not hold yet, recording
        `batch` (the batch's last entry) in the same commit; the rows appended. `first`: the
        batch's first entry (entries arrive in id order)."""
        landed, fresh = self._landed[uri], rows
        if first <= landed:
            # A batch delivered again after a crash: some or all of it is in the table.
            fresh = rows.filter(
                pl.Series([stream_version(i) > landed for i in entry_ids], dtype=pl.Boolean)
            )
        if fresh.height == 0:
            return 0
        write_deltalake(
            self._tables[uri] or uri, fresh, mode="append",
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id=self.app_id, version=batch)]
            ),
        )  # fmt: skip
        self._tables[uri] = self._tables[uri] or landed_table(uri)
        self._landed[uri] = batch
        return fresh.height

    def run(self, until_drained: bool = False, count: int = BATCH, log=None) -> None:
        """Consume until stopped (or, `until_drained`, until nothing is pending or new); a line
        per batch to `log` (default: stdout, flushed)."""
        log = log or partial(print, flush=True)
        # Out of the collector's reach from here on: what start-up made (modules, the pack) is
        # never garbage, and a batch makes ~20 objects an entry (the reply's), whose collections
        # would otherwise traverse all of it again and again.
        gc.collect()
        gc.freeze()
        while True:
            done = self.step(count)
            if done.entries:
                stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in done.seconds.items())
                log(f"{done.entries} entries: {done.clean} clean, {done.rejected} rejected, "
                    f"{done.landed} landed ({stages})")  # fmt: skip
            elif until_drained:
                return


def _committed_version(table: DeltaTable | None, app_id: str) -> int:
    """The last entry the table recorded for this app id; -1 before its first commit."""
    version = None if table is None else table.transaction_version(app_id)
    return -1 if version is None else version
