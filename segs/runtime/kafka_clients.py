"""The worker's Kafka clients: one consumer in the group, one producer for every output.

Rules the configuration encodes:

* Positions live in the database, so the consumer stores and commits no offset of its own
  (offsets reach Kafka only after a checkpoint, for lag monitoring).
* ``cooperative-sticky``: a rebalance revokes only the partitions that move.
* The producer is idempotent and never gives up on a message (``message.timeout.ms`` 0):
  outages are waited out; a checkpoint flushes it before it stores positions.
* Our tuning comes first and the user's Kafka settings override it; the settings the
  checkpoint order depends on come last and cannot be overridden.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Message, Producer

from segs.config import Settings
from segs.ops import metrics

log = logging.getLogger("segs.worker")
KAFKA_LOG = logging.getLogger("segs.kafka")  # librdkafka's own lines, as JSON like ours

# Consumer prefetch: large fetches and a deep local queue keep the poll loop fed (smaller
# ones leave the loop waiting on fetches); the queue is bounded in bytes for the whole
# consumer. README, "Memory and speed"; python -m segs.bench.prefetch_sweep.
PREFETCH: dict[str, int] = {
    "fetch.wait.max.ms": 50,
    "max.partition.fetch.bytes": 8_388_608,
    "fetch.max.bytes": 67_108_864,
    "queued.min.messages": 200_000,  # per partition, within the byte bound below
    "queued.max.messages.kbytes": 131_072,
}
PRODUCER_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes

DeliveryReport = Callable[[KafkaError | None, Message], None]


def on_kafka_error(err: KafkaError) -> None:
    """librdkafka's error callback: a lost connection shows in the gauges; all are logged."""
    if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
        metrics.KAFKA_CONSUMER_CONNECTED.set(0)
        metrics.KAFKA_PRODUCER_CONNECTED.set(0)
    log.warning("kafka: %s", err.str())


def consumer_config(settings: Settings) -> dict[str, object]:
    s = settings
    return {
        **PREFETCH,
        **s.kafka_common(),
        "group.id": s.kafka_group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": s.auto_offset_reset,
        "enable.partition.eof": False,
        "max.poll.interval.ms": s.kafka_max_poll_interval_ms,
        "session.timeout.ms": s.kafka_session_timeout_ms,
        "heartbeat.interval.ms": min(3_000, s.kafka_session_timeout_ms // 3),
        "error_cb": on_kafka_error,
        "logger": KAFKA_LOG,
    }


def producer_config(settings: Settings, *, max_message_bytes: int,
                    on_delivery: DeliveryReport) -> dict[str, object]:
    """``max_message_bytes``: the largest message the worker produces (a dead letter or a
    regional message is as large as its topic allows); never below librdkafka's default.
    ``on_delivery``: the report of messages produced without one of their own."""
    return {
        "linger.ms": 5,
        # none by default: the grid system's kafkajs consumers decode no lz4, snappy or
        # zstd batches (README, "Output compression")
        "compression.type": settings.kafka_compression,
        "queue.buffering.max.messages": 100_000,
        "message.max.bytes": max(PRODUCER_MAX_BYTES, max_message_bytes),
        **settings.kafka_common(),
        "enable.idempotence": True,
        "message.timeout.ms": 0,  # never give up on a message: outages are waited out
        "delivery.report.only.error": True,
        "on_delivery": on_delivery,
        "error_cb": on_kafka_error,
        "logger": KAFKA_LOG,
    }


def make_consumer(settings: Settings) -> Consumer:
    return Consumer(consumer_config(settings))


def make_producer(settings: Settings, *, max_message_bytes: int,
                  on_delivery: DeliveryReport) -> tuple[Producer, int]:
    """The producer, and the message size it was configured for."""
    conf = producer_config(settings, max_message_bytes=max_message_bytes,
                           on_delivery=on_delivery)
    limit = conf["message.max.bytes"]  # the user's setting, when given, is a string
    assert isinstance(limit, int | float | str)
    return Producer(conf), int(limit)
