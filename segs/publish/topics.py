"""The output topics: checked (and created when allowed) at start, their size limits learnt.

Rules:

* Every topic the service writes to must exist before a worker starts. A missing one is
  created when ``KAFKA_CREATE_TOPICS`` is on, with as many partitions as the input topic
  (the broker's default when the input topic is missing too) and the broker's default
  replication factor. Otherwise, or when the broker refuses, start-up ends with one line
  naming the topic, its setting and how to fix it (exit code 2), as Kafka Streams does for
  a missing sink topic: an undeliverable dead letter would otherwise hold its partition.
* A dead letter must fit the dead-letter topic: :func:`record_limit` learns the topic's
  ``max.message.bytes`` (the broker's default when the topic sets none), and the worker cuts
  a dead letter that would not fit (:func:`segs.publish.outputs.fit_dead_letter`).
* The regional topic is created with ``max.message.bytes`` = :data:`REGIONAL_RECORD_LIMIT`,
  room for the meter list of a region of about a million meters; a regional message that
  does not fit the topic's limit is sent without its list (:mod:`segs.publish.regional`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._metadata import TopicMetadata
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from segs.config import Settings
from segs.errors import BrokerError, ConfigError
from segs.ops.logs import SAY_EVERY_S
from segs.windows.sizes import SIZES

log = logging.getLogger("segs.topics")

DEFAULT_RECORD_LIMIT = 1_048_588  # Kafka's default max.message.bytes
REGIONAL_RECORD_LIMIT = 16_777_216  # max.message.bytes of a regional topic created here
_TIMEOUT_S = 10.0


def output_topics(settings: Settings) -> dict[str, str]:
    """Setting name → topic name of every topic the service writes to."""
    return {
        **{size.topic_setting: size.topic(settings) for size in SIZES},
        "KAFKA_TOPIC_ALERTS": settings.topic_alerts,
        "KAFKA_TOPIC_DLQ": settings.topic_dlq,
        **({"KAFKA_TOPIC_REGIONAL_AGG_1M": settings.topic_regional_1m}
           if settings.regional_aggregates else {}),
    }


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_common())


def ensure_topics(settings: Settings, *, should_stop: Callable[[], bool] = lambda: False,
                  ) -> list[str]:
    """Make sure every output topic exists; the names created. Waits for the broker
    (one line a minute) until it answers or ``should_stop()``; raises :class:`ConfigError`
    when a topic is missing and cannot be created."""
    admin = admin_client(settings)
    existing = _wait_for_metadata(admin, should_stop)
    if existing is None:
        return []
    missing = {env: name for env, name in output_topics(settings).items()
               if name not in existing}
    if not missing:
        return []
    fix = "create it (kafka-topics.sh --create --topic {name})"
    if not settings.kafka_create_topics:
        env, name = next(iter(missing.items()))
        raise ConfigError(env, f"topic {name!r} does not exist and KAFKA_CREATE_TOPICS is "
                               f"off: {fix.format(name=name)} or set KAFKA_CREATE_TOPICS=on")
    source = existing.get(settings.topic_input)
    partitions = len(source.partitions) if source is not None else -1
    created = []
    big = {"max.message.bytes": str(REGIONAL_RECORD_LIMIT)}
    new = [NewTopic(name, partitions, -1,
                    config=big if name == settings.topic_regional_1m else {})
           for name in dict.fromkeys(missing.values())]
    futures = admin.create_topics(new, request_timeout=_TIMEOUT_S)
    for env, name in missing.items():
        try:
            futures[name].result(_TIMEOUT_S)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # another host created it meanwhile
            why = err.str()
            raise ConfigError(env, f"topic {name!r} does not exist and could not be "
                                   f"created ({why}): {fix.format(name=name)} or allow "
                                   "this client to create topics") from None
        created.append(name)
        log.info("created topic %s (%s partitions, the broker's replication factor)",
                 name, partitions if partitions > 0 else "the broker's default")
    return created


def _wait_for_metadata(admin: AdminClient, should_stop: Callable[[], bool]
                       ) -> dict[str, TopicMetadata] | None:
    last_said = -SAY_EVERY_S
    while not should_stop():
        try:
            md = admin.list_topics(timeout=_TIMEOUT_S)
            if md.brokers:
                return dict(md.topics)
        except KafkaException as exc:
            why = str(exc)
        else:
            why = "no broker answered"
        if time.monotonic() - last_said >= SAY_EVERY_S:
            log.warning("cannot check the output topics yet (%s); waiting for Kafka", why)
            last_said = time.monotonic()
        time.sleep(1.0)
    return None


def record_limit(admin: AdminClient, topic: str) -> int:
    """The largest record batch ``topic`` accepts, in bytes (``max.message.bytes``)."""
    try:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)],
                                         request_timeout=_TIMEOUT_S)
        entries = next(iter(futures.values())).result(_TIMEOUT_S)
    except KafkaException as exc:
        raise BrokerError(f"cannot read the configuration of topic {topic}: {exc}") from exc
    entry = entries.get("max.message.bytes")
    return int(entry.value) if entry is not None and entry.value else DEFAULT_RECORD_LIMIT
