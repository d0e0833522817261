"""Real time: a source's events through a Redis stream into the online store and, exactly once,
into Delta (`broker`: the stream; `consumer`: a reader of its consumer group; `landed`: what the
consumers landed, read back by day for `raw_events`)."""

from eventml.stream.broker import EventStream, stream_version
from eventml.stream.consumer import Consumed, StreamConsumer

__all__ = ["Consumed", "EventStream", "StreamConsumer", "stream_version"]
