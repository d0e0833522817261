"""The stream's two processes (`make stream`; EVENTML_REDIS_URL names the Redis server):

    python -m eventml.stream consume [--until-drained] [--batch 20000] [--name consumer-1]
    python -m eventml.stream produce --days 0:30 [--seconds-per-day 2] [--users N]

`consume` reads the deployment's source stream into the online store and lands it in the
`stream_events` and `stream_rejects` Delta tables exactly once (`eventml.stream.consumer`); it
runs until stopped, and a restart under the same `--name` continues where the killed one
stopped; consumers of other names share the stream's entries between them. `produce` publishes
a built-in world's days to the stream as they happen, on an accelerated clock: each simulated
day's events in time order, spread over `--seconds-per-day` (0: as fast as possible).

Light on purpose (no Dagster import): a consumer restarts in a second or two.
"""

from __future__ import annotations

import argparse
import sys

from eventml.home import StateHome
from eventml.online_store import open_store
from eventml.stream.broker import EventStream
from eventml.stream.consumer import BATCH, StreamConsumer
from eventml.stream.landed import EVENTS, REJECTS
from eventml.stream.producer import publish_days
from eventml.worlds import load_pack, selected_pack, world


def consumer(home: StateHome, pack_ref: str, name: str = "consumer-1") -> StreamConsumer:
    spec = load_pack(pack_ref)
    return StreamConsumer(
        EventStream(home.require_redis(), spec.name), spec, open_store(home.online_store, spec),
        home.table_uri(EVENTS), home.table_uri(REJECTS), name,
    )  # fmt: skip


def produce(home: StateHome, pack_ref: str, days: range, seconds_per_day: float,
            config: dict | None = None, log=print) -> int:  # fmt: skip
    """Publish days of the built-in world `pack_ref` (`config`: its `WorldConfig` fields);
    the number of events published."""
    module, spec = world(pack_ref), load_pack(pack_ref)
    stream = EventStream(home.require_redis(), spec.name)
    world_days = module.iter_days(module.WorldConfig(**(config or {})), days)
    return publish_days(stream, world_days, seconds_per_day, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=["consume", "produce"])
    ap.add_argument("--pack", default=selected_pack(), help="default: EVENTML_PACK or lending")
    ap.add_argument("--until-drained", action="store_true", help="consume: stop when caught up")
    ap.add_argument("--batch", type=int, default=BATCH, help="consume: entries per batch at most")
    ap.add_argument(
        "--name",
        default="consumer-1",
        help="consume: this consumer's name in the group, kept across restarts",
    )
    ap.add_argument("--days", default="0:7", help="produce: world days FIRST:END")
    ap.add_argument("--seconds-per-day", type=float, default=2.0)
    ap.add_argument("--users", type=int, help="produce: the world's people (default: its own)")
    args = ap.parse_args()
    home = StateHome.from_env()
    try:
        if args.command == "consume":
            consumer(home, args.pack, args.name).run(
                until_drained=args.until_drained, count=args.batch
            )
        else:
            first, end = (int(d) for d in args.days.split(":"))
            config = {"n_users": args.users} if args.users else {}
            produce(home, args.pack, range(first, end), args.seconds_per_day, config)
    except KeyboardInterrupt:
        pass
    except ValueError as error:
        sys.exit(f"eventml.stream {args.command}: {error}")


if __name__ == "__main__":
    main()
