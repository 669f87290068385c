"""Ceiling: the fastest a single Python consumer reads the pre-loaded topic on this machine —
bare (``consume`` and ``value()`` of each message), and with the service's decoder.

librdkafka's default ``max.partition.fetch.bytes`` (1 MiB) holds a bare consumer to about
half of what it reads with larger fetches here, so the ceiling uses :data:`BIG_FETCH`; the
same read with the service's fetch settings (the defaults) is measured beside it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from segs.columns import Interner
from segs.decode import Decoder

BATCH = 10_000
BIG_FETCH = {"fetch.max.bytes": 104_857_600, "max.partition.fetch.bytes": 10_485_760}


def read_topic(bootstrap: str, topic: str, ends: dict[int, int], *, decode: bool,
               fetch: dict[str, int] | None = None) -> dict[str, Any]:
    """Read every partition from the beginning to ``ends``; readings/s from first message."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": "segs-bench-ceiling",
        "enable.auto.commit": False, "fetch.wait.max.ms": 50,
        "queued.max.messages.kbytes": 65536, **(BIG_FETCH if fetch is None else fetch),
    })
    decoder = Decoder(Interner(), Interner())
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    todo = {p: end for p, end in ends.items() if end > 0}
    total = sum(todo.values())
    seen = valid = counted = 0
    first: float | None = None
    consume = consumer.consume
    deadline = time.monotonic() + 600
    try:
        while seen < total and time.monotonic() < deadline:
            msgs = consume(BATCH, 0.5)
            if not msgs:
                continue
            values = [m.value() for m in msgs]
            if decode:
                parts = np.fromiter((m.partition() for m in msgs), np.int32, len(msgs))
                offsets = np.fromiter((m.offset() for m in msgs), np.int64, len(msgs))
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
    return {"messages": seen, "fetch": BIG_FETCH if fetch is None else fetch,
            "valid": valid if decode else None, "seconds": elapsed,
            "readings_per_s": counted / elapsed if elapsed > 0 else 0.0}
