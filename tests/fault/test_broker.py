"""The Kafka broker stops for 10 s and comes back on the same port with the same data.

While it is away the workers cannot fetch, and a checkpoint cannot flush the producer, so
it fails and is retried with intake paused; the database transaction is never attempted
before the dead letters and alerts of the covered messages are delivered. After the restart
the group re-forms and every reading is counted once.
"""

from __future__ import annotations

import time

import pytest

from tests.fault.conftest import Fault

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_exact_through_a_10_s_broker_restart(fault: Fault) -> None:
    local = fault.kafka.local
    if local is None:
        pytest.skip("needs the local Kafka broker to stop and start it")
    before = fault.stream(30_000, 6_000, seed=401)()
    svc = fault.service(workers=2).start()
    fault.wait_progress(at_least=10_000)
    fault.on_cleanup.append(lambda: local.proc is None and local.start())
    local.stop()
    fault.inject("Kafka broker down 10 s")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        time.sleep(1)
        fault.rss.sample()
    local.start()
    after = fault.stream(30_000, 6_000, seed=402)()
    fault.verify(before + after, svc, replays=True)  # an unflushed checkpoint re-reads
    fault.assert_no_crash(svc)
    assert svc.stop() == 0
