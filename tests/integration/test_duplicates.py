"""Re-sent readings end to end (issue 21): counted once, however late and whatever happens
to the workers in between; ``DEDUPLICATE=off`` counts every message, as before."""

from __future__ import annotations

import random
import threading
import time

import pytest
from confluent_kafka import Producer

from segs.tools.simulator import SimMessage, SimulatorOptions, generate
from tests.integration.test_pipeline import SIM, Run, signal_kill
from tests.pipeline import Service, assert_exact, end_offsets, expected, process_all, wait_consumed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _produce(run: Run, messages: list[SimMessage]) -> None:
    producer = Producer({"bootstrap.servers": run.kafka.bootstrap, "linger.ms": 5})
    for i, m in enumerate(messages):
        producer.produce(run.topics.input, m.value, m.key)
        if i % 1_000 == 999:
            producer.poll(0)
            time.sleep(0.25)  # about 4,000 messages/s
    assert producer.flush(30) == 0


def test_resent_readings_count_once_late_after_storage_and_across_a_kill(
        run: Run, cleanup: list[Service]) -> None:
    """The simulator's duplicates, plus re-sends of 1 % of the messages 1–3,000 positions
    later (some land after a worker's SIGKILL), plus 300 re-sends of random earlier ones once
    everything is stored and closed (50 meters, 400 s of event time: many of their windows
    are no longer in any worker's memory)."""
    opts = SimulatorOptions(**{**SIM, "meters": 50, "count": 20_000, "seed": 21})
    fresh = [m for batch in generate(opts) for m in batch]
    rng = random.Random(21)
    stream = list(fresh)
    for i in sorted(rng.sample(range(len(fresh)), len(fresh) // 100), reverse=True):
        stream.insert(min(len(stream), i + rng.randint(1, 3_000)), fresh[i])
    svc = run.service()
    cleanup.append(svc)
    svc.start()
    feeder = threading.Thread(target=_produce, args=(run, stream))
    feeder.start()
    time.sleep(2.5)
    signal_kill(random.choice(svc.wait_workers(2)))
    feeder.join(120)
    wait_consumed(run.db_url, run.topics.group, run.topics.input,
                  end_offsets(run.kafka.bootstrap, run.topics.input), service=svc)
    time.sleep(4)  # idle advance closes every window; the checkpoints store them
    late = [fresh[i] for i in rng.sample(range(len(fresh)), 300)]
    _produce(run, late)
    run.verify(stream + late, svc)
    assert svc.metric("stream_duplicate_readings_total") >= 300
    assert svc.stop() == 0


def test_deduplicate_off_counts_every_message(run: Run) -> None:
    opts = SimulatorOptions(**{**SIM, "count": 6_000, "seed": 22})
    messages = [m for batch in generate(opts) for m in batch]
    _produce(run, messages)
    process_all(run.kafka.bootstrap, run.db_url, run.topics, run.tmp / "off.log",
                DEDUPLICATE="off")
    now = int(time.time() * 1000)
    every, _ = expected(messages, now, deduplicate=False)
    once, _ = expected(messages, now)
    assert every != once, "the simulator sent no duplicate"
    assert_exact(run.db_url, every)
