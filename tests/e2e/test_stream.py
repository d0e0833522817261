"""Real time, for real: a world's days published to a Redis stream (`python -m eventml.stream
produce`) while one consumer (`... consume`) is SIGKILLed again and again at random moments and
a second shares the stream beside it; afterwards the online store and the landed Delta table
hold exactly the world's events (none lost, none twice) and the rejects table exactly the bad
ones, each with its reason."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from eventml.home import StateHome
from eventml.online_store import open_store
from eventml.stream import EventStream
from eventml.worlds.lending import PACK, WorldConfig, simulate

REPO = Path(__file__).resolve().parents[2]
KILLS = 10
DAYS, USERS = 6, 600


@pytest.fixture
def env(tmp_path, redis_url) -> dict:
    return {**os.environ, "EVENTML_HOME": str(tmp_path / "home"), "EVENTML_REDIS_URL": redis_url,
            "EVENTML_PACK": "lending"}  # fmt: skip


def stream_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "eventml.stream", *args]


def bad_copies(world: pl.DataFrame) -> tuple[list[dict], dict[str, str]]:
    """Events the contract refuses, and later copies of delivered ones; event id → reason."""
    rows = world.head(40).to_dicts()
    broken = [
        {**rows[0], "event_id": "bad-type", "event_type": "??"},
        {**rows[1], "event_id": "bad-amount", "amount": -5.0},
        {**rows[2], "event_id": "bad-time", "ts": "yesterday"},
        {k: v for k, v in rows[3].items() if k != "entity_id"} | {"event_id": "bad-entity"},
    ]
    copies = rows[10:40]  # sent again by an at-least-once producer
    reasons = {"bad-type": "unknown_event_type", "bad-amount": "negative_amount",
               "bad-time": "unparseable_ts", "bad-entity": "missing_entity_id",
               **{r["event_id"]: "duplicate_event_id" for r in copies}}  # fmt: skip
    return broken + copies, reasons


def test_a_consumer_killed_again_and_again_lands_every_event_exactly_once(env, redis_url):
    world = simulate(WorldConfig(n_users=USERS), range(DAYS))
    bad, reasons = bad_copies(world)
    producer = subprocess.Popen(
        stream_command("produce", "--days", f"0:{DAYS}", "--users", str(USERS),
                       "--seconds-per-day", "5"),
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def send_bad() -> None:  # in the middle of the stream, a few at a time
        stream = EventStream(redis_url, PACK.name)
        for i in range(0, len(bad), 5):
            time.sleep(1.5)
            stream.publish(bad[i : i + 5])

    sender = threading.Thread(target=send_bad)
    sender.start()
    steady = subprocess.Popen(stream_command("consume", "--batch", "200", "--name", "consumer-2"),
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    rng, stream, left_pending = random.Random(0), EventStream(redis_url, PACK.name), []
    for kill in range(KILLS):
        consumer = subprocess.Popen(stream_command("consume", "--batch", "200"), env=env,
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        if kill % 2:  # at any moment: starting, waiting for entries, or busy with a batch
            time.sleep(rng.uniform(1.0, 4.0))
        else:  # inside a batch: delivered, then within 50 ms (validated, stored, landed, acked?)
            deadline = time.monotonic() + 15
            while (
                not stream.pending_by_consumer().get("consumer-1") and time.monotonic() < deadline
            ):
                assert consumer.poll() is None, consumer.communicate()[1][-2000:]
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
        assert consumer.poll() is None, consumer.communicate()[1][-2000:]
        consumer.send_signal(signal.SIGKILL)
        consumer.wait()
        left_pending.append(stream.pending_by_consumer().get("consumer-1", 0))
    sender.join()
    # Some kills came between a batch's delivery and its acknowledgement: the next consumer
    # started on those entries again.
    print("pending after each kill:", left_pending)
    assert sum(p > 0 for p in left_pending) >= 2, left_pending
    assert producer.wait(timeout=120) == 0, producer.stderr.read()[-2000:]
    assert steady.poll() is None, steady.communicate()[1][-2000:]
    steady.send_signal(signal.SIGKILL)
    steady.wait()
    assert {name for name, _ in EventStream(redis_url, PACK.name).consumer_stats().items()} == {
        "consumer-1", "consumer-2"}  # both took a share  # fmt: skip
    for name in ("consumer-1", "consumer-2"):  # each restarts on its own pending entries
        drained = subprocess.run(stream_command("consume", "--until-drained", "--name", name),
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert drained.returncode == 0, drained.stderr[-2000:]

    home = StateHome(Path(env["EVENTML_HOME"]))
    order = ["entity_id", "ts", "event_id"]
    landed = pl.read_delta(home.table_uri("stream_events"))
    assert landed["event_id"].is_unique().all()
    assert landed.drop("day").sort(order).equals(world.sort(order))
    rejects = pl.read_delta(home.table_uri("stream_rejects"))
    assert dict(zip(rejects["event_id"], rejects["reason"])) == reasons
    assert rejects.height == len(reasons)
    stored = open_store(redis_url, PACK).histories(world["entity_id"].unique().to_list())
    assert stored.sort(order).equals(world.sort(order))
    assert EventStream(redis_url, PACK.name).backlog() == {"lag": 0, "pending": 0}
