"""What a worker produces to Kafka: dead letters, alerts, and rows the database stores.

Rules:

* Nothing is dropped. A full producer queue is served until the message fits; a message
  Kafka refuses for good is kept and produced again before the next checkpoint may store
  the positions that cover it (:meth:`Outbox.deliver_pending`).
* A closed window or regional message Kafka refuses stays unpublished in the database and is
  claimed again by a later checkpoint, so it is counted, not kept.
* Delivery callbacks run on librdkafka's thread (the loop's or the checkpoint thread's flush):
  the refused list has a lock of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Message as KafkaMessage
from confluent_kafka.admin import AdminClient

from segs.checkpoint.sink import ClosedRow
from segs.config import Settings
from segs.detection.detector import KINDS, Detections
from segs.errors import SegsError
from segs.intake.decode import Reject
from segs.intake.readings import Interner, Readings
from segs.ops import metrics
from segs.ops.logs import SAY_EVERY_S
from segs.publish.alerts import encode_alerts
from segs.publish.outputs import Message, dead_letter_headers, encode_aggregates, fit_dead_letter
from segs.publish.topics import DEFAULT_RECORD_LIMIT, admin_client, output_topics, record_limit
from segs.runtime.kafka_clients import make_producer
from segs.windows.sizes import BY_SECONDS, SIZES

log = logging.getLogger("segs.worker")
Headers = list[tuple[str, bytes]]
_FLUSH_S = 10.0  # how long a checkpoint waits for the producer before it retries


@dataclass(frozen=True, slots=True)
class Refused:
    """A dead letter or alert Kafka refused for good: produced again until delivered."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    reason: str


class Outbox:
    """The worker's producer, with the messages Kafka refused."""

    def __init__(self, settings: Settings, *, meters: Interner, regions: Interner) -> None:
        self.s = settings
        self.meters, self.regions = meters, regions
        self.admin: AdminClient = admin_client(settings)
        self._refused: list[Refused] = []  # appended by delivery callbacks on any thread
        self._refused_lock = threading.Lock()
        self.refused_closed = 0  # closed windows Kafka refused (their rows stay unpublished)
        self._closed_topics = {size.topic(settings) for size in SIZES}
        if settings.regional_aggregates:  # refused ones stay unpublished in the database too
            self._closed_topics.add(settings.topic_regional_1m)
        self._said_at = -SAY_EVERY_S  # when refusals were said last (monotonic)
        dlq_limit = self._topic_limit(settings.topic_dlq, DEFAULT_RECORD_LIMIT)
        regional_limit = (self._topic_limit(settings.topic_regional_1m, DEFAULT_RECORD_LIMIT)
                          if settings.regional_aggregates else 0)
        # a dead letter is as large as the topic allows (then cut: fit_dead_letter), a
        # regional message too (then without its meter list: segs.publish.regional.encode)
        self.producer, self.max_bytes = make_producer(
            settings, max_message_bytes=max(dlq_limit, regional_limit),
            on_delivery=self._on_delivery)
        metrics.start_series(tuple(output_topics(settings).values()))
        self.dlq_limit = min(dlq_limit, self.max_bytes)
        self.regional_limit = min(regional_limit, self.max_bytes)

    # ------------------------------------------------------------------ producing

    def dead_letters(self, msgs: Sequence[KafkaMessage], rejects: Sequence[Reject]) -> None:
        dlq, topic, limit = self.s.topic_dlq, self.s.topic_input, self.dlq_limit
        by_reason: dict[str, int] = {}
        for index, reason, detail in rejects:
            m = msgs[index]  # a consumed message has a partition and an offset
            headers = dead_letter_headers(reason, detail, topic, cast(int, m.partition()),
                                          cast(int, m.offset()))
            self.produce(dlq, *fit_dead_letter(m.key(), m.value(), headers, limit))
            by_reason[reason] = by_reason.get(reason, 0) + 1
        for reason, count in by_reason.items():
            metrics.INVALID_MESSAGES.labels(reason).inc(count)
        metrics.DLQ_PUBLISHED.inc(len(rejects))

    def alerts(self, det: Detections, readings: Readings) -> None:
        for key, value, headers in encode_alerts(det, readings, self.meters, self.regions,
                                                 self.s.topic_input):
            self.produce(self.s.topic_alerts, key, value, headers)
        kinds = np.bincount(det.kind, minlength=len(KINDS))
        for kind, count in zip(KINDS, kinds.tolist(), strict=True):
            if count:
                metrics.ANOMALIES_DETECTED.labels(kind).inc(count)
        metrics.ALERTS_PUBLISHED.inc(len(det))

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: Headers) -> None:
        report = None
        if topic not in self._closed_topics:  # a delivery report carries no headers

            def report(err: KafkaError | None, msg: KafkaMessage) -> None:
                if err is not None:
                    self._refuse(topic, key, value, headers, err.str())

        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers,  # type: ignore[arg-type]
                                      on_delivery=report)
                return
            except BufferError:  # queue full: serve it, never drop
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused at once (e.g. MSG_SIZE_TOO_LARGE)
                self._refuse(topic, key, value, headers, exc.args[0].str())
                return

    def _on_delivery(self, err: KafkaError | None, msg: KafkaMessage) -> None:
        """Closed windows' delivery reports (errors only: librdkafka retries the rest
        forever); dead letters and alerts carry their own (:meth:`produce`)."""
        if err is not None:
            self._refuse(msg.topic() or "", msg.key(), msg.value(), [], err.str())

    def _refuse(self, topic: str, key: bytes | None, value: bytes | None,
                headers: Headers, reason: str) -> None:
        metrics.PUBLISH_ERRORS.labels(topic).inc()
        if topic in self._closed_topics:
            self.refused_closed += 1
            return
        with self._refused_lock:
            self._refused.append(Refused(topic, key, value, list(headers), reason))

    def forget_refused(self) -> None:
        """After a rewind: the covered messages are read again, so produced again."""
        with self._refused_lock:
            self._refused.clear()

    # ------------------------------------------------------------------ delivering

    def deliver_pending(self) -> str | None:
        """Checkpoint step 0: every message produced so far delivered, those Kafka refused
        produced again first (dead letters cut to the topic's current limit: the operator
        may have changed it). Why not all arrived, or None."""
        if self.producer.flush(_FLUSH_S) > 0:
            return self.stuck()
        with self._refused_lock:
            taken, self._refused = self._refused, []
        if taken:
            if time.monotonic() - self._said_at >= SAY_EVERY_S:
                log.warning("Kafka refused %d messages for %s (%s); producing them again",
                            len(taken), ", ".join(sorted({r.topic for r in taken})),
                            taken[0].reason)
                self._said_at = time.monotonic()
            dlq = self.s.topic_dlq
            if any(r.topic == dlq for r in taken):
                self.dlq_limit = min(self._topic_limit(dlq, self.dlq_limit), self.max_bytes)
            for r in taken:
                self.produce(r.topic, *(fit_dead_letter(r.key, r.value, r.headers,
                                                        self.dlq_limit)
                                        if r.topic == dlq else (r.key, r.value, r.headers)))
            if self.producer.flush(_FLUSH_S) > 0:
                return self.stuck()
        with self._refused_lock:
            left = list(self._refused)
        metrics.UNDELIVERED.set(len(left))
        if not left:
            return None
        topics = sorted({r.topic for r in left})
        return (f"Kafka refused {len(left)} messages for {', '.join(topics)} "
                f"({left[0].reason}); their positions are not stored until they are "
                "delivered: check that the topic exists and its max.message.bytes")

    def deliver_closed(self, size_s: int, rows: list[ClosedRow]) -> None:
        self._deliver_rows(BY_SECONDS[size_s].topic(self.s), encode_aggregates(size_s, rows),
                           "closed windows")

    def deliver_regional(self, messages: list[Message]) -> None:
        self._deliver_rows(self.s.topic_regional_1m, messages, "regional aggregates")

    def _deliver_rows(self, topic: str, messages: Sequence[Message], what: str) -> None:
        """Produce messages of stored rows and wait until Kafka has them; raises when it
        does not (the rows stay unpublished and are claimed again)."""
        refused = self.refused_closed
        for key, value, headers in messages:
            self.produce(topic, key, value, headers)
        if self.producer.flush(_FLUSH_S) > 0:
            raise SegsError(f"{what}: {self.stuck()}")
        if self.refused_closed != refused:
            raise SegsError(f"Kafka refused {what} for {topic}: check that the topic exists")

    def stuck(self) -> str:
        """Why the producer could not deliver in time, as far as metadata tells: a missing
        output topic (librdkafka waits for a deleted topic to come back), or Kafka away."""
        why = "Kafka producer could not deliver within 10 s"
        try:
            present = self.producer.list_topics(timeout=5).topics
        except KafkaException as exc:
            return f"{why} ({exc.args[0].str()})"
        missing = [t for t in output_topics(self.s).values() if t not in present]
        if missing:
            return f"{why}: topic {', '.join(missing)} does not exist; create it"
        return why

    def input_partitions(self) -> int:
        """The input topic's partition count, from Kafka's metadata (thread-safe)."""
        topic = self.s.topic_input
        try:
            md = self.producer.list_topics(topic, timeout=5).topics.get(topic)
        except KafkaException as exc:
            raise SegsError(f"cannot read the partitions of {topic}: {exc}") from exc
        if md is None or md.error is not None or not md.partitions:
            raise SegsError(f"cannot read the partitions of {topic}")
        return len(md.partitions)

    def _topic_limit(self, topic: str, fallback: int) -> int:
        try:
            return record_limit(self.admin, topic)
        except SegsError as exc:
            log.warning("%s; assuming %d bytes", exc, fallback)
            return fallback
