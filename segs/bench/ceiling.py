"""Ceiling: the fastest a single Python consumer reads the pre-loaded topic on this machine —
bare (``consume`` and ``value()`` of each message), and with the service's decoder.

The bare read gets every advantage the service has and more: the service's prefetch
(:data:`segs.runtime.kafka_clients.PREFETCH`) and twice its default batch. librdkafka's
defaults (1 MiB fetches, 10,000-message batches) read about half as fast here; that read is
measured beside it for reference."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from segs.intake.decode import Decoder
from segs.intake.readings import Interner, meter_interner
from segs.runtime.kafka_clients import PREFETCH

BATCH = 100_000  # twice the service's default BATCH_SIZE
DEFAULTS_BATCH = 10_000


def read_topic(bootstrap: str, topic: str, ends: dict[int, int], *, decode: bool,
               fetch: dict[str, int] | None = None, batch: int = BATCH) -> dict[str, Any]:
    """Read every partition from the beginning to ``ends``; readings/s from first message.
    ``fetch`` None means the service's prefetch, ``{}`` librdkafka's defaults."""
    fetch = PREFETCH if fetch is None else fetch
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": "segs-bench-ceiling",
        "enable.auto.commit": False, **fetch,
    })
    decoder = Decoder(meter_interner(), Interner())
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    todo = {p: end for p, end in ends.items() if end > 0}
    total = sum(todo.values())
    seen = valid = counted = 0
    first: float | None = None
    consume = consumer.consume
    deadline = time.monotonic() + 600
    try:
        while seen < total and time.monotonic() < deadline:
            msgs = consume(batch, 0.5)
            if not msgs:
                continue
            values = list(map(Message.value, msgs))
            if decode:
                parts = np.fromiter(map(Message.partition, msgs), np.int32, len(msgs))
                offsets = np.fromiter(map(Message.offset, msgs), np.int64, len(msgs))
                readings, _ = decoder.decode(values, parts, offsets, int(time.time() * 1000))
                valid += len(readings)
            seen += len(values)
            if first is None:  # the clock starts once data flows: count what follows
                first = time.perf_counter()
            else:
                counted += len(values)
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
    return {"messages": seen, "fetch": fetch, "batch": batch,
            "valid": valid if decode else None, "seconds": elapsed,
            "readings_per_s": counted / elapsed if elapsed > 0 else 0.0}
