"""The stream consumer's throughput and event-to-servable latency, on a real Redis server.

    EVENTML_REDIS_URL=$(scripts/services.sh redis-url) .venv/bin/python bench/stream.py

1. Throughput: a backlog of the lending world's events (every entry already in the stream) is
   consumed in batches: events/s into the online store and Delta, and where each batch's time
   goes (validation, the online store, the two Delta commits, the acknowledgement).
2. Latency: a producer thread offers events at a fixed rate while the consumer runs beside it;
   an event's latency is from its publication (its entry id's millisecond) to the moment the
   batch holding it was written to the online store, i.e. servable. p50 and p99 per offered rate.

The reference: the issue's targets on 2 cores, >= 50,000 events/s consumed and p99 <= 1 s at
10,000 events/s offered.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid

import numpy as np
import polars as pl

from eventml.online_store import open_store
from eventml.stream import EventStream, StreamConsumer
from eventml.worlds.lending import PACK, WorldConfig, simulate


def world_rows(n: int) -> list[dict]:
    events = simulate(WorldConfig(n_users=max(200, n // 30)), range(60))
    while events.height < n:  # more people until the backlog is long enough
        events = pl.concat([events, events.with_columns(pl.col("event_id") + "x")])
    return events.sort("ts").head(n).to_dicts()


def consumer_for(url: str, tmp: str, store: str) -> StreamConsumer:
    stream = EventStream(url, PACK.name)
    online = open_store(url if store == "redis" else f"{tmp}/store.sqlite", PACK)
    return StreamConsumer(stream, PACK, online, f"{tmp}/stream_events", f"{tmp}/stream_rejects")


def throughput(server: str, rows: list[dict], store: str, batch: int) -> dict:
    url = f"{server}?prefix=bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        consumer = consumer_for(url, tmp, store)
        consumer.stream.publish(rows)
        stages = dict.fromkeys(("validate", "online_store", "delta", "ack"), 0.0)
        started, n = time.perf_counter(), 0
        while (done := consumer.step(batch, block_ms=1)).entries:
            n += done.entries
            for k, v in done.seconds.items():
                stages[k] += v
        seconds = time.perf_counter() - started
    return {"events": n, "seconds": seconds, "events_per_s": n / seconds, **stages}


def latency(server: str, rows: list[dict], store: str, rate: int, seconds: float) -> dict:
    url = f"{server}?prefix=bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        consumer = consumer_for(url, tmp, store)
        total = min(len(rows), int(rate * seconds))
        tick = 0.01  # publish every 10 ms
        per_tick = max(1, int(rate * tick))

        def produce() -> None:
            start = time.time()
            for i in range(0, total, per_tick):
                wait = start + (i // per_tick) * tick - time.time()
                if wait > 0:
                    time.sleep(wait)
                consumer.stream.publish(rows[i : i + per_tick])

        producer = threading.Thread(target=produce)
        producer.start()
        waited, seen = [], 0
        while seen < total:
            entries = consumer.stream.read(consumer.name, 5_000, block_ms=50)
            if not entries:
                continue
            consumer.consume(entries)
            servable = time.time() * 1e3  # the batch is in the online store (and landed)
            waited += [servable - int(i.split("-")[0]) for i, _ in entries]
            seen += len(entries)
        producer.join()
    ms = np.array(waited)
    return {"offered_per_s": rate, "events": seen, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--store", choices=["sqlite", "redis"], default="redis")
    ap.add_argument("--seconds", type=float, default=10.0, help="of offered load per rate")
    args = ap.parse_args()
    server = os.environ.get("EVENTML_REDIS_URL") or "redis://127.0.0.1:56379/0"
    rows = world_rows(args.events)
    got = throughput(server, rows, args.store, args.batch)
    print(f"throughput ({args.store} online store, batches of {args.batch}): "
          f"{got['events']:,} events in {got['seconds']:.1f} s = {got['events_per_s']:,.0f} "
          f"events/s (target 50,000); time in " + ", ".join(
              f"{k} {got[k]:.1f} s" for k in ("validate", "online_store", "delta", "ack")))  # fmt: skip
    for rate in (1_000, 10_000):
        lat = latency(server, rows, args.store, rate, args.seconds)
        print(f"latency at {rate:,} events/s offered ({lat['events']:,} events): publish to "
              f"servable p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms (target p99 1,000 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
