"""SIGTERM at awkward moments: in the middle of a checkpoint, and while workers start.

To stop the service *inside* a checkpoint, the test holds a lock on ``stream_positions``
from its own connection: the next checkpoint's transaction (COPY and merge done, positions
next) waits on it, visible in ``pg_stat_activity``, and SIGTERM arrives right then.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.fault.conftest import Fault, wait_checkpoint_blocked

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SHUTDOWN_TIMEOUT_S = 8


@contextmanager
def positions_locked(db_url: str) -> Iterator[psycopg.Connection]:
    """Hold an exclusive lock on stream_positions until the block ends."""
    conn = psycopg.connect(db_url)
    try:
        conn.execute("LOCK TABLE stream_positions IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def test_sigterm_in_the_middle_of_a_checkpoint(fault: Fault) -> None:
    # 60,000 at 6,000/s: readings still flow (so checkpoints still write positions) when
    # the lock is taken, however fast the service caught up
    svc = fault.service(workers=2, SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT_S)).start()
    fault.wait_log(svc, "assigned partitions [", count=2)  # the stream starts after the join
    join = fault.stream(60_000, 6_000, seed=201)
    fault.wait_progress(at_least=5_000)
    with positions_locked(fault.db_url):
        with psycopg.connect(fault.db_url, autocommit=True) as conn:
            wait_checkpoint_blocked(conn)
        svc.signal(15)
        fault.inject("SIGTERM inside a checkpoint")
        t0 = time.monotonic()
        time.sleep(1.0)  # the checkpoint stays stuck a while after the signal
    code = svc.proc.wait(SHUTDOWN_TIMEOUT_S + 10) if svc.proc else None
    took = time.monotonic() - t0
    assert code == 0, svc.log_text()[-3000:]
    assert took < SHUTDOWN_TIMEOUT_S
    assert svc.log_text().count("stopped after its final checkpoint") == 2
    messages = join()
    again = fault.service(workers=2, name="again").start()
    fault.verify(messages, again)
    assert again.stop() == 0


def test_sigterm_while_a_checkpoint_outlasts_the_shutdown_timeout(fault: Fault) -> None:
    svc = fault.service(workers=2, SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT_S)).start()
    fault.wait_log(svc, "assigned partitions [", count=2)  # the stream starts after the join
    join = fault.stream(60_000, 6_000, seed=202)  # still flowing when the lock is taken
    fault.wait_progress(at_least=5_000)
    with positions_locked(fault.db_url):
        with psycopg.connect(fault.db_url, autocommit=True) as conn:
            wait_checkpoint_blocked(conn)
        t0 = time.monotonic()
        svc.signal(15)
        fault.inject("SIGTERM inside a checkpoint that never ends")
        code = svc.proc.wait(SHUTDOWN_TIMEOUT_S + 10) if svc.proc else None
        took = time.monotonic() - t0
    assert code == 1  # workers killed after SHUTDOWN_TIMEOUT: no clean final checkpoint
    assert took < SHUTDOWN_TIMEOUT_S + 6
    assert "did not stop within" in svc.log_text()
    messages = join()
    again = fault.service(workers=2, name="again").start()
    fault.verify(messages, again, replays=True)  # its workers were killed
    assert again.stop() == 0


def test_sigterm_while_workers_are_still_starting(fault: Fault) -> None:
    messages = fault.produce([])
    svc = fault.service(workers=2).start()
    fault.wait_log(svc, "worker 1 started")
    svc.signal(15)  # the workers are still importing: no handler, no state yet
    fault.inject("SIGTERM during start-up")
    assert svc.stop(timeout_s=30) == 0, svc.log_text()[-3000:]
    again = fault.service(workers=2, name="again").start()
    fault.wait_workers(again, 2)
    join = fault.stream(5_000, 0, seed=203)
    messages = join()
    fault.verify(messages, again)
    assert again.stop() == 0
