"""The HTTP endpoint of `segs-stream run` under what the field does to it.

Aborted requests (TCP reset), a thousand idle connections, a burst of concurrent ``/ready``
calls, and an input topic that does not exist yet: the endpoint keeps answering, its
threads stay bounded, stderr stays JSON lines, and ``/ready`` tells the truth.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from segs.tools.harness import create_topics
from tests.fault.conftest import Fault
from tests.pipeline import Service

pytestmark = [pytest.mark.fault]


def _get(port: int, path: str, timeout_s: float = 10) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _wait_status(port: int, path: str, want: int, timeout_s: float = 60) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = _get(port, path, timeout_s=5)
        except OSError as exc:
            status, body = 0, str(exc).encode()
        if status == want:
            return body
        assert time.monotonic() < deadline, f"{path} stayed {status}: {body!r}"
        time.sleep(0.3)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def _started(fault: Fault, **env: str) -> tuple[Service, int]:
    svc = fault.service(workers=1, **env).start()
    port = svc.http_port()
    _wait_status(port, "/health", 200)
    return svc, port


def _reset(port: int, send: bytes) -> None:
    """Connect, send ``send`` (maybe nothing), and abort with a TCP reset (SO_LINGER 0)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if send:
            s.sendall(send)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def test_aborted_requests_leave_no_traceback(fault: Fault) -> None:
    svc, port = _started(fault)
    before = len(svc.log_text().splitlines())
    kinds = (b"", b"GET /metr", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    for i in range(1_000):
        _reset(port, kinds[i % 3])
        if i % 100 == 99:  # fail early rather than after a thousand tracebacks
            assert "Traceback" not in svc.log_text(), svc.log_text()[-3000:]
    fault.inject("TCP reset request", 1_000)
    assert _get(port, "/health")[0] == 200
    time.sleep(1.0)  # what the server writes about them is written by now
    lines = svc.log_text().splitlines()
    fault.entry.notes.append(f"{len(lines) - before} log lines after 1,000 resets")
    assert "Traceback" not in "\n".join(lines), "\n".join(lines[-40:])
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    assert len(lines) - before < 20, "\n".join(lines[-20:])


def test_idle_connections_stay_bounded_and_scrapes_still_answer(fault: Fault) -> None:
    svc, port = _started(fault)
    assert svc.proc is not None
    base = _threads(svc.proc.pid)
    idle: list[socket.socket] = []
    try:
        for i in range(1_000):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request that never ends
            idle.append(s)
            if i % 100 == 99:  # fail early rather than after a thousand threads
                assert _threads(svc.proc.pid) < base + 20, f"{i + 1} idle: threads grow"
        fault.inject("idle connection", 1_000)
        time.sleep(0.5)
        threads = _threads(svc.proc.pid)
        fault.entry.notes.append(f"threads {base} before, {threads} with 1,000 idle")
        assert threads < base + 20, f"{threads} threads with 1,000 idle connections ({base})"
        t0 = time.monotonic()
        status, body = _get(port, "/metrics", timeout_s=5)
        assert status == 200 and b"stream_messages_total" in body
        assert _get(port, "/health", timeout_s=5)[0] == 200
        took = time.monotonic() - t0
        fault.entry.notes.append(f"/metrics + /health answered in {took:.2f} s")
        assert took < 2.0
        # the read timeout closes what is left of them: the client reads end of stream
        deadline = time.monotonic() + 15
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 0.5)
            for s in readable:
                with contextlib.suppress(OSError):
                    s.recv(4096)
                open_.remove(s)
        assert not open_, f"{len(open_)} idle connections still open after 15 s"
    finally:
        for s in idle:
            s.close()
    assert _threads(svc.proc.pid) < base + 20


def test_concurrent_ready_calls_answer_at_once(fault: Fault) -> None:
    _, port = _started(fault)
    _wait_status(port, "/ready", 200)

    def ready(_: int) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            status, _ = _get(port, "/ready", timeout_s=10)
        except OSError:
            status = 0
        return status, time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(300) as pool:
        results = list(pool.map(ready, range(300)))
    took = time.monotonic() - t0
    fault.inject("concurrent /ready", 300)
    fault.entry.notes.append(f"300 concurrent /ready in {took:.2f} s, slowest "
                             f"{max(r[1] for r in results):.2f} s")
    slow = [r for r in results if r[0] != 200 or r[1] > 5]
    assert not slow, f"{len(slow)} of 300 /ready failed or took > 5 s, e.g. {slow[:3]}"
    assert took < 8, f"300 concurrent /ready took {took:.1f} s"
    body = json.loads(_get(port, "/ready")[1])
    assert 0 <= body["checked_s_ago"] < 10, body  # the age of the cached server check


def test_ready_waits_for_the_input_topic(fault: Fault) -> None:
    missing = f"raw_readings.late.{uuid.uuid4().hex[:8]}"
    _, port = _started(fault, KAFKA_TOPIC_INPUT=missing)
    fault.inject("input topic missing")
    body = json.loads(_wait_status(port, "/ready", 503, timeout_s=5))
    want = f"input topic {missing} does not exist"
    deadline = time.monotonic() + 20
    while want not in body.get("missing", []):  # workers start first, then the check runs
        assert time.monotonic() < deadline, body
        time.sleep(0.3)
        status, raw = _get(port, "/ready")
        assert status == 503, raw
        body = json.loads(raw)
    create_topics(fault.kafka.bootstrap, {missing: 6})
    body = json.loads(_wait_status(port, "/ready", 200, timeout_s=30))
    assert body["missing"] == [], body
