"""Regional aggregates from two hosts, one of whose workers is SIGKILLed mid-stream.

Two `segs-stream run` processes share the consumer group and the database as two hosts do;
a region's meters are spread over partitions that both own. Each region-window is rolled up
by whichever worker holds the group's advisory lock after its checkpoint, and published by
claim; a worker killed while it computes or delivers leaves its rows unpublished (or its
claim to expire), so the other host, or its restarted self, publishes them.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.fault.conftest import Fault
from tests.integration.test_regional import CAPS, CAPS_ENV, _start_ms, late_readings
from tests.pipeline import latest_regional, wait_regional
from tests.reference import regional

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_two_hosts_and_a_killed_worker_publish_every_region_window(fault: Fault) -> None:
    join = fault.stream(24_000, 3_000, seed=118, meters=2000, regions=10, interval_s=20,
                        start_ms=_start_ms())
    a = fault.service(workers=1, name="host-a", REGION_CAPACITY_KW=CAPS_ENV).start()
    b = fault.service(workers=1, name="host-b", REGION_CAPACITY_KW=CAPS_ENV).start()
    victim = fault.wait_workers(a, 1)[0]
    fault.wait_workers(b, 1)
    fault.wait_progress(at_least=8_000)
    os.kill(victim, signal.SIGKILL)
    fault.inject("worker SIGKILL")
    fault.wait_log(a, "exited with code -9")
    messages = join()
    fault.verify(messages, a, replays=True)
    bootstrap, topic = fault.kafka.bootstrap, fault.topics.regional
    from tests.pipeline import expected

    want, _ = expected(messages, int(time.time() * 1000))
    ref = regional(want[60], CAPS)
    assert len({r for r, _ in ref}) == 10
    fault.entry.windows += wait_regional(fault.db_url, bootstrap, topic, ref, CAPS,
                                         timeout_s=90)
    before = latest_regional(bootstrap, topic)

    window = max((s for r, s in ref if r == "north"), key=lambda s: ref[("north", s)].meter_count)
    late = fault.produce(late_readings(messages, window))  # type: ignore[arg-type]
    fault.inject("late readings", len(late))
    messages += late
    fault.verify(messages, a, replays=True)
    want, _ = expected(messages, int(time.time() * 1000))
    ref = regional(want[60], CAPS)
    wait_regional(fault.db_url, bootstrap, topic, ref, CAPS)
    after = latest_regional(bootstrap, topic)
    assert after[("north", window)]["meter_count"] == before[("north", window)]["meter_count"] + 1
    assert a.stop() == 0 and b.stop() == 0
