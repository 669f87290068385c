"""Crashes: workers and the whole service die by SIGKILL mid-stream; nothing is lost or doubled.

A killed worker's unsaved windows die with it; the supervisor restarts it and its
partitions resume from the positions stored in the same transaction as the aggregates, so
the readings since the last checkpoint are read again and counted once.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.fault.conftest import Fault

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_a_random_worker_killed_three_times(fault: Fault) -> None:
    join = fault.stream(60_000, 5_000, seed=101)
    svc = fault.service(workers=2).start()
    rng = random.Random(101)
    for n in range(1, 4):
        pids = fault.wait_workers(svc, 2)
        fault.wait_progress(at_least=n * 6_000)
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        fault.inject("worker SIGKILL")
        fault.wait_log(svc, "exited with code -9", count=n)
    messages = join()
    fault.verify(messages, svc, replays=True)
    assert svc.log_text().count("restarting worker") == 3
    assert svc.stop() == 0


def test_supervisor_and_all_workers_killed_then_started_again(fault: Fault) -> None:
    join = fault.stream(40_000, 5_000, seed=102)
    first = fault.service(workers=2, name="first").start()
    fault.wait_workers(first, 2)
    fault.wait_progress(at_least=10_000)
    first.kill()  # SIGKILL the supervisor and every worker, as a power cut would
    fault.inject("supervisor+workers SIGKILL")
    assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
    time.sleep(1)
    again = fault.service(workers=2, name="again").start()
    messages = join()
    fault.verify(messages, again, replays=True)
    assert again.stop() == 0
