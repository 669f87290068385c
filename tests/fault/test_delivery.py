"""What Kafka refuses: oversize dead letters, topics that shrink or vanish, topics missing at start.

The rule under test: a message's position is stored only after everything it produced was
delivered; a message Kafka refuses for good is produced again (a dead letter cut to what the
topic accepts) while intake is paused, and the operator is told. Never a crash-restart
loop, never a position stored past an undelivered dead letter. A topic missing at start is
created when allowed, else the start ends with one line and exit code 2.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from segs.publish.topics import REGIONAL_RECORD_LIMIT
from segs.tools.harness import create_topics, delete_topics
from tests.conftest import Topics
from tests.fault.conftest import Fault
from tests.pipeline import (
    SEGS,
    Service,
    assert_exact,
    end_offsets,
    expected,
    read_topic,
    service_env,
    stored_positions,
    wait_consumed,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow]

VALID = dict(invalid_fraction=0.0, duplicate_fraction=0.0, late_fraction=0.0,
             out_of_order_fraction=0.0)


def set_topic_config(bootstrap: str, topic: str, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entries = [ConfigEntry(k.replace("_", "."), v, incremental_operation=AlterConfigOpType.SET)
               for k, v in config.items()]
    res = ConfigResource("topic", topic, incremental_configs=entries)
    for fut in admin.incremental_alter_configs([res], request_timeout=30).values():
        fut.result(30)


def dead_letters(bootstrap: str, topic: str) -> dict[str, tuple[bytes | None, bytes | None,
                                                                  dict[str, bytes], int]]:
    """segs.source → (key, value, headers, record size) of every dead letter."""
    out = {}
    for m in read_topic(bootstrap, topic):
        headers = dict(m.headers())
        size = len(m.key() or b"") + len(m.value() or b"")
        out[headers["segs.source"].decode()] = (m.key(), m.value(), headers, size)
    return out


def sources(bootstrap: str, topic: str, values: set[bytes]) -> dict[bytes, str]:
    """value → topic/partition/offset of the input messages with those values."""
    return {m.value(): f"{topic}/{m.partition()}/{m.offset()}"
            for m in read_topic(bootstrap, topic, timeout_s=60) if m.value() in values}


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dead_letters_larger_than_their_topic_allows_are_cut_to_fit(fault: Fault) -> None:
    """Issue 16 cases 1 and 2: an invalid message over librdkafka's default message.max.bytes
    (value, or key) and one over the dead-letter topic's max.message.bytes. Before the fix
    the first crashed the worker on every restart and the second was lost after its
    position was stored."""
    t = fault.topics
    set_topic_config(fault.kafka.bootstrap, t.dlq, max_message_bytes="2000")
    svc = fault.service().start()
    join = fault.stream(3_000, 1_500, **VALID)
    time.sleep(0.5)
    big_value = b"x" * 1_000_100
    big_key = b"K" * 1_000_000
    five_kb = b'{"meterId":"' + b"m" * 5_000 + b'"}'
    hostile = [(None, big_value, 0), (big_key, b"not json", 1), (b"k5", five_kb, 2)]
    fault.inject("oversize_dead_letter", len(hostile))
    fault.produce(hostile)
    messages = join()
    all_values = [m.value for m in messages] + [v for _, v, _ in hostile]
    ends = end_offsets(fault.kafka.bootstrap, t.input)
    assert sum(ends.values()) == len(all_values)
    wait_consumed(fault.db_url, t.group, t.input, ends, service=svc, timeout_s=90)

    want, invalid = expected(messages, int(time.time() * 1000))
    assert not invalid
    fault.entry.readings += assert_exact(fault.db_url, want) // 2
    where = sources(fault.kafka.bootstrap, t.input, {v for _, v, _ in hostile})
    letters = dead_letters(fault.kafka.bootstrap, t.dlq)
    assert set(letters) == set(where.values()), letters.keys()
    for key, value, _ in hostile:
        got_key, got_value, headers, size = letters[where[value]]
        assert size <= 2000, size
        assert headers["segs.truncated"] == (
            f"key={len(key) if key is not None else -1},value={len(value)}".encode())
        assert value.startswith(got_value or b"") and len(got_value or b"") >= min(len(value), 900)
        assert (key or b"").startswith(got_key or b"")
        assert headers["segs.error"]
    fault.assert_no_crash(svc)
    assert svc.stop() == 0


def test_a_dead_letter_topic_that_shrinks_while_running_is_followed(fault: Fault) -> None:
    """Issue 16 case 2: the broker refuses a dead letter for good (the topic's
    max.message.bytes was lowered after the worker learnt it). The worker produces it again,
    cut to the new limit, before the position covering it is stored; before the fix it
    died and its restart stored the position past the lost dead letter."""
    t = fault.topics
    svc = fault.service().start()
    join = fault.stream(4_000, 800, **VALID)
    fault.wait_progress(at_least=200)
    set_topic_config(fault.kafka.bootstrap, t.dlq, max_message_bytes="3000")
    fault.inject("topic_limit_lowered")
    five_kb = random.Random(5).randbytes(5_000)  # lz4 must not shrink it below the limit
    fault.produce([(b"k", five_kb, 3)])
    messages = join()
    ends = end_offsets(fault.kafka.bootstrap, t.input)
    wait_consumed(fault.db_url, t.group, t.input, ends, service=svc, timeout_s=90)
    want, _ = expected(messages, int(time.time() * 1000))
    fault.entry.readings += assert_exact(fault.db_url, want) // 2
    letters = dead_letters(fault.kafka.bootstrap, t.dlq)
    [(_, value, headers, size)] = letters.values()
    assert size <= 3000 and five_kb.startswith(value or b"")
    assert headers["segs.truncated"] == f"key=1,value={len(five_kb)}".encode()
    fault.assert_no_crash(svc)
    assert "Kafka refused 1 messages for" in svc.log_text()
    assert svc.stop() == 0


def test_a_vanished_dead_letter_topic_pauses_intake_until_it_is_back(fault: Fault) -> None:
    """Issue 16 cases 2 and 9: the dead-letter topic is deleted while the service runs (the
    test broker does not create topics on use). The dead letter cannot be delivered, so the
    position before it stays stored, intake pauses, /ready says not ready and the log says
    why; once the topic is back, the dead letter arrives and the stream goes on, exact."""
    t = fault.topics
    svc = fault.service(workers=1).start()
    port = svc.http_port()
    first = fault.produce([(f"m{i}".encode(), _reading(f"m{i}", i), i % 6) for i in range(60)])
    fault.wait_progress(at_least=60)
    delete_topics(fault.kafka.bootstrap, [t.dlq])
    fault.inject("dlq_deleted")
    time.sleep(2)
    bad = b"not json at all"
    later = fault.produce([(b"k", bad, 4)] + [(f"n{i}".encode(), _reading(f"n{i}", i), i % 6)
                                               for i in range(60)])
    bad_offset = end_offsets(fault.kafka.bootstrap, t.input)[4] - 11  # 10 readings follow it
    deadline = time.monotonic() + 90
    while True:  # not ready, and the position of partition 4 never passes the dead letter
        status, body = http_get(port, "/ready")
        if status == 503 and "degraded" in body:
            break
        assert time.monotonic() < deadline, f"/ready stayed {status}: {body}"
        time.sleep(0.5)
    time.sleep(3)
    assert stored_positions(fault.db_url, t.group, t.input).get(4, 0) <= bad_offset
    assert svc.proc is not None and svc.proc.poll() is None
    log_text = svc.log_text()
    assert "intake" in log_text and t.dlq in log_text, log_text[-3000:]
    status, _ = http_get(port, "/metrics")
    assert status == 200

    create_topics(fault.kafka.bootstrap, {t.dlq: 3})
    messages = first + later
    ends = end_offsets(fault.kafka.bootstrap, t.input)
    wait_consumed(fault.db_url, t.group, t.input, ends, service=svc, timeout_s=120)
    want, invalid = expected(messages, int(time.time() * 1000))
    fault.entry.readings += assert_exact(fault.db_url, want) // 2
    letters = dead_letters(fault.kafka.bootstrap, t.dlq)
    assert [v for _, v, _, _ in letters.values()] == [bad]
    assert [m.value for m, _ in invalid] == [bad]
    fault.assert_no_crash(svc)
    assert svc.stop() == 0


def _reading(meter: str, i: int) -> bytes:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 120 + i)) + ".000Z"
    return json.dumps({"meterId": meter, "region": "r1", "timestamp": ts,
                       "powerKw": 1.5 + i, "energyKwh": 0.01}).encode()


# --------------------------------------------------------------------------- start-up


def _run_until_exit(env: dict[str, str], cwd: Path,
                    timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEGS, "--env-file", "/dev/null", "run", "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False, cwd=cwd)


def _bare_topics(bootstrap: str) -> Topics:
    """Topic names of which only the input topic exists (6 partitions)."""
    tag = uuid.uuid4().hex[:10]
    t = Topics(f"raw_readings.{tag}", f"aggregates_1m.{tag}", f"aggregates_15m.{tag}",
               f"alerts.{tag}", f"raw_readings.dlq.{tag}", f"segs-{tag}",
               f"aggregates_1m_regional.{tag}")
    create_topics(bootstrap, {t.input: 6})
    return t


def test_missing_output_topics_are_created_at_start(fault: Fault) -> None:
    """Issue 16 case 9: every output topic is created when missing, with the input topic's
    partition count; before the fix nothing was created and dead letters had nowhere to go."""
    t = _bare_topics(fault.kafka.bootstrap)
    svc = Service(service_env(fault.kafka.bootstrap, fault.db_url, t.env()),
                  fault.tmp / "create.log", workers=1)
    fault.services.append(svc)
    svc.start()
    fault.inject("output_topics_missing", 5)
    admin = AdminClient({"bootstrap.servers": fault.kafka.bootstrap})
    deadline = time.monotonic() + 60
    outputs = [t.agg_1m, t.agg_15m, t.alerts, t.dlq, t.regional]
    while True:
        md = admin.list_topics(timeout=10).topics
        if all(name in md for name in outputs):
            break
        assert time.monotonic() < deadline, svc.log_text()[-3000:]
        time.sleep(0.5)
    assert all(len(md[name].partitions) == 6 for name in outputs)
    svc.http_port()
    assert svc.log_text().count("created topic") == 5
    # the regional topic takes the meter list of a large region (segs.publish.topics)
    res = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t.regional)])
    limit = next(iter(res.values())).result(10)["max.message.bytes"].value
    assert int(limit) == REGIONAL_RECORD_LIMIT
    assert svc.stop() == 0


def test_a_missing_topic_that_may_not_be_created_ends_the_start(fault: Fault) -> None:
    """Issue 16 case 9: with KAFKA_CREATE_TOPICS=off, or a topic the broker refuses to
    create, the start ends with one line naming the setting, and exit code 2."""
    t = _bare_topics(fault.kafka.bootstrap)
    for name in (t.agg_1m, t.agg_15m, t.alerts):
        create_topics(fault.kafka.bootstrap, {name: 3})
    env = service_env(fault.kafka.bootstrap, fault.db_url, t.env(), KAFKA_CREATE_TOPICS="off")
    res = _run_until_exit(env, fault.tmp)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "KAFKA_TOPIC_DLQ" in line]
    assert len(errors) == 1 and t.dlq in errors[0] and "KAFKA_CREATE_TOPICS" in errors[0]
    assert "Traceback" not in res.stderr + res.stdout

    env = service_env(fault.kafka.bootstrap, fault.db_url,
                      {**t.env(), "KAFKA_TOPIC_DLQ": "no such/topic"})
    res = _run_until_exit(env, fault.tmp)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "KAFKA_TOPIC_DLQ" in line]
    assert len(errors) == 1 and "could not be created" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    admin = AdminClient({"bootstrap.servers": fault.kafka.bootstrap})
    assert "no such/topic" not in admin.list_topics(timeout=10).topics
