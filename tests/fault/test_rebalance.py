"""Rebalances: a second service joins and leaves three times; a stalled worker comes back.

Ownership of a partition moves between workers while readings flow. A worker giving a
partition up checkpoints it first (revoke); a worker that was frozen past the session
timeout lost its partitions without being asked, and when it wakes up it must not write
for them: its position compare-and-set fails (``FencedError``) or librdkafka reports the
loss first (``on_lost``), and it rewinds to what is stored. A trigger on
``stream_positions`` records which connection wrote every position, so the test can show
that the stalled worker wrote none for the partitions it had lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.fault.conftest import Fault
from tests.pipeline import Service

pytestmark = [pytest.mark.fault, pytest.mark.slow]

FAST_GROUP = {"KAFKA_SESSION_TIMEOUT": "6", "KAFKA_MAX_POLL_INTERVAL": "6"}


def test_rebalance_storm_a_second_service_joins_and_leaves_three_times(fault: Fault) -> None:
    join = fault.stream(90_000, 3_000, seed=501)
    first = fault.service(workers=2, name="first").start()
    fault.wait_progress(at_least=3_000)
    for n in range(3):
        second = fault.service(workers=1, name=f"second-{n}").start()
        wait_assigned_some(second)
        fault.inject("service joined")
        done = sum(fault.wait_progress().values())
        # both services checkpoint meanwhile (unless a slow start let the stream end first)
        fault.wait_progress(at_least=min(done + 1_500, 90_000))
        assert second.stop() == 0, second.log_text()[-3000:]
        fault.inject("service left")
    messages = join()
    fault.verify(messages, first)
    fault.assert_no_crash(first)
    assert first.stop() == 0


def wait_assigned_some(svc: Service, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(r"assigned partitions \[\d", svc.log_text()):
        assert time.monotonic() < deadline, "the joining service got no partition"
        time.sleep(0.1)


_TRIGGER = """
CREATE TABLE test_position_writes (kafka_partition int, next_offset bigint,
    client_port int, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION test_record_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_position_writes (kafka_partition, next_offset, client_port)
    VALUES (NEW.kafka_partition, NEW.next_offset, inet_client_port());
    RETURN NEW;
END $$;
CREATE TRIGGER test_record_position AFTER INSERT OR UPDATE ON stream_positions
    FOR EACH ROW EXECUTE FUNCTION test_record_position();
"""


def test_a_stalled_worker_does_not_write_for_partitions_it_lost(fault: Fault) -> None:
    join = fault.stream(60_000, 4_000, seed=502)
    svc = fault.service(workers=2, **FAST_GROUP).start()
    fault.wait_progress(at_least=2_000)
    with psycopg.connect(fault.db_url, autocommit=True) as conn:
        conn.execute(_TRIGGER)
    pids = fault.wait_workers(svc, 2)
    deadline = time.monotonic() + 60
    while not all(owned(svc, pid) for pid in pids):
        assert time.monotonic() < deadline, "both workers never owned partitions"
        time.sleep(0.2)
    stalled = pids[0]
    lost = owned(svc, stalled)
    pg_port = urlsplit(fault.db_url).port or 5432
    ports = pg_client_ports(stalled, pg_port)
    assert ports, "the stalled worker holds no database connection"

    os.kill(stalled, signal.SIGSTOP)
    fault.inject("worker SIGSTOP past the session timeout")
    fault.on_cleanup.append(lambda: os.kill(stalled, signal.SIGCONT))
    t_stop = time.time()
    try:
        # the other worker takes the partitions over and stores a position for each of them:
        # until it has, the stalled worker's compare-and-set would rightly pass for that one
        deadline = time.monotonic() + 60
        while not taken_over(fault.db_url, lost, ports, t_stop):
            assert time.monotonic() < deadline, "nobody took the stalled worker's partitions"
            time.sleep(0.2)
    finally:
        os.kill(stalled, signal.SIGCONT)
    t_cont = time.time()
    deadline = time.monotonic() + 60
    while not woke_fenced(svc, stalled, t_cont):
        assert time.monotonic() < deadline, "the stalled worker never noticed its loss"
        time.sleep(0.2)

    messages = join()
    fault.verify(messages, svc, replays=True)  # its unsaved work is re-read by the new owner
    ports |= pg_client_ports(stalled, pg_port)
    regained = assignments_after(svc, stalled, t_cont)
    with psycopg.connect(fault.db_url) as conn:
        writes = conn.execute(
            "SELECT kafka_partition, extract(epoch FROM at)::float8 FROM test_position_writes "
            "WHERE client_port = ANY(%s) AND at > to_timestamp(%s)",
            (sorted(ports), t_stop)).fetchall()
    first_regain = min((t for t, _ in regained), default=float("inf"))
    early = [(p, at) for p, at in writes if at < first_regain]
    assert not early, f"the stalled worker wrote positions before it was given any: {early}"
    again = set().union(*(parts for _, parts in regained)) if regained else set()
    assert {p for p, _ in writes} <= again, (writes, regained)
    assert svc.stop() == 0


def log_lines(svc: Service, pid: int) -> list[dict[str, object]]:
    out = []
    for line in svc.log_text().splitlines():
        if f'"pid": {pid}' not in line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _parts(msg: str) -> set[int]:
    m = re.search(r"\[([\d, ]*)\]", msg)
    return {int(x) for x in m.group(1).split(",") if x.strip()} if m else set()


def owned(svc: Service, pid: int) -> set[int]:
    """Partitions the worker owns now, replayed from its assign/revoke/lost log lines."""
    have: set[int] = set()
    for rec in log_lines(svc, pid):
        msg = str(rec.get("msg", ""))
        if msg.startswith("assigned partitions"):
            have |= _parts(msg)
        elif msg.startswith(("revoking partitions", "lost partitions")):
            have -= _parts(msg)
    return have


def _ts(rec: dict[str, object]) -> float:
    return datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00")).timestamp()


def woke_fenced(svc: Service, pid: int, since: float) -> bool:
    return any(_ts(r) >= since - 1 and ("lost partitions" in str(r["msg"]) or
                                        "another worker owns it" in str(r["msg"]))
               for r in log_lines(svc, pid))


def assignments_after(svc: Service, pid: int, since: float) -> list[tuple[float, set[int]]]:
    return [(_ts(r), _parts(str(r["msg"]))) for r in log_lines(svc, pid)
            if _ts(r) >= since and str(r["msg"]).startswith("assigned partitions")
            and _parts(str(r["msg"]))]


def taken_over(db_url: str, lost: set[int], ports: set[int], since: float) -> bool:
    """Another connection stored a position for every partition in ``lost`` since then."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT kafka_partition) FROM test_position_writes "
            "WHERE kafka_partition = ANY(%s) AND NOT client_port = ANY(%s) "
            "AND at > to_timestamp(%s)",
            (sorted(lost), sorted(ports), since)).fetchone()
    return bool(row and row[0] == len(lost))


def pg_client_ports(pid: int, pg_port: int) -> set[int]:
    """Local TCP ports of ``pid``'s connections to the database server."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == pg_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
