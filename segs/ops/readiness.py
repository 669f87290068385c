"""The server half of ``/ready``: one background thread checks Kafka and PostgreSQL.

``/ready`` must be cheap whatever calls it and however often, so it never touches a server:
it reads the latest answer of :class:`ServerCheck`, which every ``INTERVAL_S`` asks

* Kafka, through one long-lived AdminClient, for the input topic's metadata: no broker, or
  no such topic, is not ready (a consumer of a missing topic would idle and say nothing);
* PostgreSQL, with one short connection and ``SELECT 1``.

Each check has its own ``TIMEOUT_S``. The answer carries its age; an answer older than
``STALE_S`` (the thread is stuck) is itself a reason not to be ready.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from segs.config import Settings

log = logging.getLogger("segs.readiness")

INTERVAL_S = 3.0
"""Pause between two checks: how late /ready may notice a change."""
TIMEOUT_S = 2.0
"""Budget of each server's check."""
STALE_S = 3 * (INTERVAL_S + 2 * TIMEOUT_S)
"""An answer older than this means the check itself is stuck."""

_kafka_log = logging.getLogger("segs.kafka")


class ServerCheck:
    """Checks the servers from a daemon thread; :meth:`latest` is what ``/ready`` reads."""

    def __init__(self, settings: Settings, interval_s: float = INTERVAL_S) -> None:
        self.s = settings
        self.interval_s = interval_s
        self._missing: list[str] = ["servers not checked yet"]
        self._checked_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._admin: Any = None
        self._thread = threading.Thread(target=self._loop, name="segs-ready-check",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2 * TIMEOUT_S) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def latest(self) -> tuple[list[str], float | None]:
        """What the last check found missing, and its age in seconds (None: no check yet)."""
        with self._lock:
            missing, at = list(self._missing), self._checked_at
        if at is None:
            return missing, None
        age = time.monotonic() - at
        if age > STALE_S:
            missing.append(f"server check is stale ({age:.0f} s old)")
        return missing, age

    def check(self) -> list[str]:
        """Check both servers now; what is missing (empty when both answer)."""
        missing = self._kafka()
        if not _database_answers(self.s):
            missing.append("database does not answer")
        return missing

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                missing = self.check()
            except Exception as exc:  # a bug in a check must not end the checks
                log.exception("server check failed")
                missing = [f"server check failed: {exc}"]
            with self._lock:
                self._missing, self._checked_at = missing, time.monotonic()
            self._stop.wait(self.interval_s)

    def _kafka(self) -> list[str]:
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import AdminClient

        topic = self.s.topic_input
        try:
            if self._admin is None:
                conf: dict[str, Any] = {
                    **self.s.kafka_common(),
                    # a metadata request for one topic would create it where brokers
                    # auto-create topics: a readiness check must not change the cluster
                    "allow.auto.create.topics": False,
                    "logger": _kafka_log,
                    "log_level": 3,  # errors only: the workers already report outages
                }
                self._admin = AdminClient(conf)
            self._admin.poll(0)  # serves librdkafka's log lines
            md = self._admin.list_topics(topic=topic, timeout=TIMEOUT_S)
        except Exception:
            return ["kafka does not answer"]
        if not md.brokers:
            return ["kafka does not answer"]
        meta = md.topics.get(topic)
        if meta is None or not meta.partitions or (
                meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            return [f"input topic {topic} does not exist"]
        if meta.error is not None:
            return [f"input topic {topic}: {meta.error.str()}"]
        return []


def _database_answers(settings: Settings) -> bool:
    import psycopg

    try:
        with psycopg.connect(settings.postgres_url.get(),
                             connect_timeout=max(2, round(TIMEOUT_S))) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
