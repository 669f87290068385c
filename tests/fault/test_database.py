"""The database goes away: a 20 s outage, and backends killed in the middle of checkpoints.

While the database is away a worker pauses its partitions and retries the same checkpoint
payload with jittered back-off, so intake stops and memory stays flat. A backend killed
mid-transaction rolls back everything of that checkpoint; a backend killed just as it
committed leaves the client unsure, and the compare-and-set on the position then refuses
the retry, so the worker rewinds to what is stored instead of writing it twice.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.fault.conftest import Fault, wait_checkpoint_blocked

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_exact_through_a_20_s_database_outage(fault: Fault) -> None:
    local = fault.postgres.local
    if local is None:
        pytest.skip("needs the local PostgreSQL server to stop and start it")
    join = fault.stream(60_000, 3_000, seed=301)
    svc = fault.service(workers=2).start()
    fault.wait_progress(at_least=3_000)
    fault.on_cleanup.append(local.start)  # whatever happens, the server comes back
    local.stop()
    fault.inject("PostgreSQL down 20 s")
    rss_during: list[int] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        time.sleep(1)
        fault.rss.sample()
        rss_during.append(fault.rss.peak)
    local.start()
    messages = join()
    fault.verify(messages, svc, replays=True)  # a revoke without the database may re-read
    text = svc.log_text()
    assert "pausing intake" in text and "resuming intake" in text
    assert max(rss_during) < fault.rss_bound_kb
    assert svc.stop() == 0


def terminate_service_backends(db_url: str, stop: threading.Event, killed: list[int]) -> None:
    """Kill the service's backends of this database whenever one is in a transaction."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend' "
                "AND state IN ('active', 'idle in transaction')").fetchall()
            killed.append(sum(1 for (ok,) in rows if ok))
            time.sleep(0.01)


def terminate_inside_checkpoint(db_url: str) -> bool:
    """Catch one checkpoint between its merge and its positions, and kill its backend."""
    with psycopg.connect(db_url) as locker, psycopg.connect(db_url, autocommit=True) as conn:
        locker.execute("LOCK TABLE stream_positions IN ACCESS EXCLUSIVE MODE")
        pid = wait_checkpoint_blocked(conn)
        ok = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        locker.rollback()
    return bool(ok and ok[0])


def test_exact_when_backends_are_terminated_during_checkpoints(fault: Fault) -> None:
    join = fault.stream(50_000, 4_000, seed=302)
    svc = fault.service(workers=2, FLUSH_INTERVAL_1M="300").start()
    fault.wait_progress(at_least=3_000)
    # six checkpoints killed at a known point: aggregates merged, positions not yet written
    for _ in range(6):
        assert terminate_inside_checkpoint(fault.db_url)
        fault.inject("pg_terminate_backend inside a checkpoint")
    # then, for 4 s, any backend of the service seen inside a transaction
    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=terminate_service_backends,
                              args=(fault.db_url, stop, killed), daemon=True)
    fault.on_cleanup.append(stop.set)
    killer.start()
    time.sleep(4)
    stop.set()
    killer.join(10)
    fault.inject("pg_terminate_backend while busy", sum(killed))
    messages = join()
    fault.verify(messages, svc, replays=True)  # a fenced retry rewinds and re-reads
    fault.assert_no_crash(svc)
    assert svc.stop() == 0


def test_a_fenced_first_checkpoint_leaves_the_connection_usable(db_url: str) -> None:
    """Regression: the temp tables were created inside the first checkpoint's transaction,
    so a fenced first checkpoint rolled them back and every later one failed for good."""
    from segs.checkpoint.migrate import migrate
    from segs.checkpoint.sink import Sink
    from segs.errors import FencedError

    migrate(db_url)
    sink = Sink(db_url, consumer_group="g", topic="t")
    sink.open()
    try:
        row = ("m", "r", 0, 1, 1.0, 1.0, 1.0, 0.0, 0, 0)
        with pytest.raises(FencedError):
            sink.commit({60: [row]}, [], {0: (5, 6, None)})  # nothing stored at 5: fenced
        sink.commit({60: [row]}, [], {0: (None, 1, None)})
        sink.commit({60: [row]}, [], {0: (1, 2, None)})
    finally:
        sink.close()
    with psycopg.connect(db_url) as conn:
        got = conn.execute("SELECT sample_count FROM aggregates_1m").fetchall()
        pos = conn.execute("SELECT next_offset FROM stream_positions").fetchall()
    assert got == [(2,)] and pos == [(2,)]
