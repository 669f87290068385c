"""Churn: three waves of new meter ids, each wave idle before the next, and some meters of
the first wave returning in the third.

Each wave's meters are evicted once event time has moved ``METER_IDLE_EVICT`` past them, so
a worker holds about one wave of meters, never all three; the returning meters get their
baselines back from ``meter_baselines`` (their alerts are the reference's); aggregates are
exact. RSS is asserted loosely: at these sizes librdkafka's buffers outweigh the meters.
"""

from __future__ import annotations

import collections
import time

import pytest

from segs.tools.procfs import status_kb
from tests.fault.conftest import Fault
from tests.fault.test_shapes import reading, scrape
from tests.integration.test_alerts_e2e import _alerts, _iso, _key, _valid
from tests.reference import detect

pytestmark = [pytest.mark.fault]

WAVE = 5_000  # meters per wave
MINUTE = 60_000
GAP = 20 * MINUTE  # event time between waves; METER_IDLE_EVICT is half of it
RETURNING = 500  # meters of wave 1 that come back in wave 3


def test_three_waves_of_new_meters_hold_one_wave_and_stay_exact(fault: Fault) -> None:
    svc = fault.service(workers=2, METER_IDLE_EVICT="600", MIN_SAMPLES="2").start()
    fault.wait_workers(svc, 2)
    base = (int(time.time() * 1000) - 2 * 60 * MINUTE) // MINUTE * MINUTE
    messages, evicted, hwm = [], [], []
    for wave in range(3):
        t = base + wave * GAP
        batch = [(f"C{wave}-{i}".encode(), reading(f"C{wave}-{i}", t + k * 10_000, 1.0 + k), None)
                 for k in range(2) for i in range(WAVE)]
        if wave == 2:  # a tenfold spike against the baseline stored before their eviction
            batch += [(f"C0-{i}".encode(), reading(f"C0-{i}", t + 30_000, 20.0), None)
                      for i in range(RETURNING)]
        # event time moves on in every partition: the wave's windows close, its meters idle
        batch += [(f"tick-{p}".encode(), reading(f"tick-{p}", t + GAP // 2 + MINUTE, 1.0), p)
                  for p in range(6)]
        messages += fault.produce(batch)
        fault.wait_progress(120, at_least=len(messages))
        port = svc.http_port()
        wanted = (wave + 1) * WAVE + (RETURNING if wave == 2 else 0)
        deadline = time.monotonic() + 60
        while (scrape(port, "stream_meters_evicted_total") < wanted
               or scrape(port, "stream_meters_held") > 6):  # the ticks stay
            assert time.monotonic() < deadline, "the idle wave was never evicted"
            time.sleep(0.2)
        evicted.append(scrape(port, "stream_meters_evicted_total"))
        hwm.append(max(status_kb(pid, "VmHWM") for pid in svc.worker_pids()))
    fault.inject("3 waves of 5,000 new meter ids")
    fault.verify(messages, svc, invalid=[])
    # a meter read by both workers around a rebalance, and a tick, may be evicted twice
    assert evicted[-1] < 3 * WAVE + RETURNING + 100, evicted
    assert hwm[2] < 1.3 * hwm[0], f"peak RSS per worker after each wave: {hwm} kB"
    got = collections.Counter(_key(a) for a in _alerts(fault.kafka, fault.topics.alerts))
    want = collections.Counter((m, _iso(ts), k, s)
                               for m, ts, k, s in detect(_valid(messages), min_samples=2))
    assert got == want
    assert sum(1 for m, *_ in want if m.startswith("C0-")) == RETURNING
    assert svc.stop() == 0


def test_returning_meters_wait_for_the_database_when_their_baselines_cannot_be_read(
        fault: Fault) -> None:
    """Evicted meters come back while PostgreSQL is down: the look-up of their baselines
    fails, the worker rewinds and waits rather than check them against no baseline, and
    once the database is back their alerts are the reference's and the aggregates exact."""
    local = fault.postgres.local
    if local is None:
        pytest.skip("needs the local PostgreSQL server to stop and start it")
    svc = fault.service(workers=2, METER_IDLE_EVICT="600", MIN_SAMPLES="2").start()
    fault.wait_workers(svc, 2)
    base = (int(time.time() * 1000) - 2 * 60 * MINUTE) // MINUTE * MINUTE
    meters = 1_000
    first = [(f"R-{i}".encode(), reading(f"R-{i}", base + k * 10_000, 1.0 + k), None)
             for k in range(2) for i in range(meters)]
    first += [(f"tick-{p}".encode(), reading(f"tick-{p}", base + GAP // 2 + MINUTE, 1.0), p)
              for p in range(6)]
    messages = fault.produce(first)
    fault.wait_progress(120, at_least=len(messages))
    port = svc.http_port()
    deadline = time.monotonic() + 60
    while scrape(port, "stream_meters_evicted_total") < meters:
        assert time.monotonic() < deadline, "the idle meters were never evicted"
        time.sleep(0.2)
    fault.on_cleanup.append(local.start)  # whatever happens, the server comes back
    local.stop()
    fault.inject("PostgreSQL down while evicted meters return")
    t = base + GAP
    messages += fault.produce(  # a tenfold spike against the baseline stored before
        [(f"R-{i}".encode(), reading(f"R-{i}", t, 20.0), None) for i in range(meters)]
        + [(f"tick-{p}".encode(), reading(f"tick-{p}", t + MINUTE, 1.0), p) for p in range(6)])
    fault.wait_log(svc, "cannot read the baselines of returning meters", 60)
    local.start()
    fault.verify(messages, svc, invalid=[], replays=True)
    got = collections.Counter(_key(a) for a in _alerts(fault.kafka, fault.topics.alerts))
    want = collections.Counter((m, _iso(ts), k, s)
                               for m, ts, k, s in detect(_valid(messages), min_samples=2))
    assert sum(1 for m, *_ in want if m.startswith("R-")) == meters
    assert got.keys() == want.keys()  # a rewind may replay an alert (the same id)
    assert svc.stop() == 0
