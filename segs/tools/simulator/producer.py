"""The Kafka producer loop of ``segs-stream simulate``: :func:`produce`."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer

from segs.errors import BrokerError
from segs.tools.simulator.files import FileWriter
from segs.tools.simulator.model import Simulation, limited
from segs.tools.simulator.options import (
    ANOMALY_KINDS,
    KINDS,
    SimulatorOptions,
    SimulatorSummary,
)
from segs.tools.simulator.progress import Reporter

_kafka_log = logging.getLogger("segs.simulator.kafka")
_kafka_log.addHandler(logging.NullHandler())

PRODUCER_DEFAULTS: Final[dict[str, str]] = {
    "linger.ms": "10",
    "batch.size": "1000000",
    "batch.num.messages": "10000",
    "compression.type": "lz4",
    "queue.buffering.max.messages": "1000000",
    "queue.buffering.max.kbytes": "1048576",
    "message.timeout.ms": "30000",
    "enable.idempotence": "true",  # keeps each meter's readings in order through retries
}
"""Producer settings :func:`produce` starts from; the caller's settings override them."""


class _StopFlag:
    """SIGINT/SIGTERM set a flag (main thread only); a second one interrupts for real."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def produce(
    opts: SimulatorOptions,
    producer_config: dict[str, str],
    topic: str,
    *,
    file: Path | None = None,
    progress: bool = True,
    connect_timeout_s: float = 8.0,
    flush_timeout_s: float = 30.0,
) -> SimulatorSummary:
    """Simulate ``opts`` into ``topic`` (and ``file`` when given, exactly what was produced).

    Raises :class:`~segs.errors.BrokerError` when the cluster does not answer within
    ``connect_timeout_s``. SIGINT/SIGTERM stop the run cleanly (``interrupted`` is then set).
    """
    failed = [0]
    last_error: list[str | None] = [None]

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed[0] += 1
            last_error[0] = str(err.str() if hasattr(err, "str") else err)

    def on_error(err: Any) -> None:
        last_error[0] = str(err.str() if hasattr(err, "str") else err)

    config: dict[str, Any] = {**PRODUCER_DEFAULTS, **producer_config}
    config.setdefault("delivery.report.only.error", True)
    config["on_delivery"] = on_delivery
    config["error_cb"] = on_error
    try:
        producer = Producer(config, logger=_kafka_log)
    except KafkaException as exc:
        raise BrokerError(f"producer settings: {_kafka_text(exc)}") from exc
    except (TypeError, ValueError) as exc:
        raise BrokerError(f"producer settings: {exc}") from exc
    _check_cluster(
        producer, topic, str(config.get("bootstrap.servers", "?")), connect_timeout_s, last_error
    )

    sim = Simulation(opts)
    writer = FileWriter(file) if file is not None else None
    reporter = Reporter(opts.planned_messages(), progress)
    kinds: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    sent = nbytes = 0
    last_event: int | None = None
    rate = opts.rate
    step = max(1, int(rate / 50)) if rate > 0 else 1 << 30  # throttled: ~20 ms slices
    send = producer.produce
    poll = producer.poll
    t0 = time.perf_counter()
    with _StopFlag() as stop:
        try:
            for batch in limited(sim, opts, lambda: stop.set):
                keys, values = batch.keys, batch.values
                n = len(values)
                lo = 0
                while lo < n and not stop.set:
                    hi = min(n, lo + step)
                    _send_all(send, poll, topic, keys, values, lo, hi)
                    poll(0)
                    if writer is not None:
                        writer.write(
                            keys[lo:hi], values[lo:hi], batch.kinds[lo:hi], batch.anomalies[lo:hi]
                        )
                    if hi < n:
                        kinds.update(batch.kinds[lo:hi])
                        anomalies.update(a for a in batch.anomalies[lo:hi] if a is not None)
                    elif lo == 0:
                        kinds.update(batch.counts)
                        anomalies.update(batch.anomaly_counts)
                    else:
                        kinds.update(batch.kinds[lo:hi])
                        anomalies.update(a for a in batch.anomalies[lo:hi] if a is not None)
                    nbytes += sum(map(len, values[lo:hi]))
                    sent += hi - lo
                    lo = hi
                    if rate > 0:
                        _wait(poll, t0 + sent / rate, stop)
                    reporter.update(sent)
                if lo == n:
                    last_event = batch.last_event_ms
                if stop.set:
                    break
        finally:
            if writer is not None:
                writer.close()
        left = producer.flush(flush_timeout_s)
    elapsed = time.perf_counter() - t0
    reporter.update(sent, force=True)
    reporter.close()
    if left:
        failed[0] += left
        last_error[0] = last_error[0] or f"{left} messages still queued after {flush_timeout_s:g} s"
    return SimulatorSummary(
        messages=sent,
        kinds={k: kinds[k] for k in KINDS},
        anomalies={k: anomalies[k] for k in ANOMALY_KINDS},
        bytes=nbytes,
        elapsed_s=elapsed,
        rate=sent / elapsed if elapsed > 0 else 0.0,
        delivery_errors=failed[0],
        last_error=last_error[0],
        interrupted=stop.set,
        start_ms=sim.start_ms,
        last_event_ms=last_event,
        topic=topic,
        file=file,
    )


def _kafka_text(exc: KafkaException) -> str:
    err: Any = exc.args[0] if exc.args else None
    return str(err.str()) if hasattr(err, "str") else str(exc)


def _check_cluster(
    producer: Producer, topic: str, where: str, timeout_s: float, last_error: list[str | None]
) -> None:
    """Fail in ``timeout_s`` with one line when the cluster or the topic is not there
    (asking for the topic's metadata also creates it where the broker auto-creates topics)."""
    try:
        meta = producer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        detail = last_error[0] or _kafka_text(exc)
        raise BrokerError(
            f"cannot reach Kafka at {where} within {timeout_s:g} s ({detail})"
        ) from exc
    info = meta.topics.get(topic)
    err = None if info is None else info.error
    if info is None or (err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        raise BrokerError(
            f"topic {topic!r} does not exist on {where} and the broker does not create it "
            "automatically: create it first"
        )


def _send_all(
    send: Any,
    poll: Any,
    topic: str,
    keys: list[bytes | None],
    values: list[bytes],
    lo: int,
    hi: int,
) -> None:
    """``produce`` each message; a full local queue is drained with ``poll`` and retried."""
    i = lo
    while i < hi:
        try:
            for key, value in zip(keys[i:hi], values[i:hi], strict=True):
                send(topic, value, key)
                i += 1
        except BufferError:
            poll(0.05)


def _wait(poll: Any, until: float, stop: _StopFlag) -> None:
    while not stop.set and (left := until - time.perf_counter()) > 0:
        poll(min(left, 0.1))
