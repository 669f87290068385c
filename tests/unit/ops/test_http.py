"""The HTTP endpoint: /health, /ready, /metrics, 404, port 0, bind failure; hostile clients
(resets, idle and oversized requests, floods of sockets)."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from segs.errors import SegsError
from segs.ops import http
from segs.ops.http import HttpError, HttpServer


class Probe:
    def __init__(self) -> None:
        self.ready = False
        self.fail = False

    def __call__(self) -> tuple[bool, dict[str, object]]:
        if self.fail:
            raise RuntimeError("boom")
        if self.ready:
            return True, {"workers": 2}
        return False, {"missing": ["kafka", "worker-1"]}


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe: Probe) -> Iterator[HttpServer]:
    srv = HttpServer("127.0.0.1", 0, probe)
    srv.start()
    yield srv
    srv.stop()


def test_port_zero_exposes_the_bound_port(server: HttpServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_health(server: HttpServer) -> None:
    status, headers, body = _get(server.url + "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


def test_ready_503_names_what_is_missing(server: HttpServer, probe: Probe) -> None:
    status, _, body = _get(server.url + "/ready")
    assert status == 503
    assert json.loads(body) == {"status": "not ready", "missing": ["kafka", "worker-1"]}
    probe.ready = True
    status, _, body = _get(server.url + "/ready")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "workers": 2}


def test_ready_probe_exception_is_503(server: HttpServer, probe: Probe) -> None:
    probe.fail = True
    status, _, body = _get(server.url + "/ready")
    assert status == 503
    assert "boom" in json.loads(body)["error"]


def test_metrics(server: HttpServer) -> None:
    status, headers, body = _get(server.url + "/metrics?x=1")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"stream_messages_total" in body


def test_unknown_path_is_404(server: HttpServer) -> None:
    status, _, body = _get(server.url + "/nope")
    assert status == 404
    assert json.loads(body)["path"] == "/nope"


def test_requests_log_at_debug_not_stderr(
    server: HttpServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="segs.http"):
        _get(server.url + "/health")
    assert any("GET /health" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "GET" in r.getMessage())
    assert "GET /health" not in capfd.readouterr().err


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = HttpServer("127.0.0.1", port)
        with pytest.raises(HttpError, match=f"127.0.0.1:{port}") as info:
            srv.start()
    assert isinstance(info.value, SegsError)
    assert isinstance(info.value.__cause__, OSError)


def test_stop_is_idempotent_and_releases_the_port() -> None:
    srv = HttpServer("127.0.0.1", 0)
    srv.stop()
    with srv:
        port = srv.port
        assert _get(srv.url + "/ready")[0] == 200  # no probe: always ready
    srv.stop()
    again = HttpServer("127.0.0.1", port)
    again.start()
    again.stop()


# ------------------------------------------------------------------ hostile clients


def _reset(port: int, send: bytes = b"") -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if send:
        s.sendall(send)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _threads_named(prefix: str) -> int:
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def _closed_by_server(s: socket.socket, within_s: float) -> bool:
    s.settimeout(within_s)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_aborted_requests_are_a_debug_line_never_a_traceback(
    server: HttpServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="segs.http"):
        for send in (b"", b"GET /hea", b"GET /metrics HTTP/1.1\r\n\r\n") * 20:
            _reset(server.port, send)
        assert _get(server.url + "/health")[0] == 200
        time.sleep(0.3)
    assert all(r.levelno == logging.DEBUG for r in caplog.records), caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_an_idle_connection_is_closed_after_the_request_timeout(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port)) as silent, \
            socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # and never the blank line
        assert _closed_by_server(silent, 3)
        assert _closed_by_server(slow, 3)


def test_an_oversized_request_head_is_closed(server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nX: " + b"a" * (http.MAX_REQUEST_BYTES + 10))
        assert _closed_by_server(s, 3)


def test_idle_sockets_take_no_thread_and_do_not_lock_out_a_scrape(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "MAX_WAITING", 20)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    try:
        time.sleep(0.3)
        assert threading.active_count() == before
        assert _threads_named("segs-http") == 1 + http.HANDLER_THREADS
        status, _, body = _get(server.url + "/metrics")
        assert status == 200 and b"stream_messages_total" in body
        # past MAX_WAITING the oldest waiting ones were closed at once
        assert _closed_by_server(idle[0], 3)
    finally:
        for s in idle:
            s.close()


def test_one_request_per_connection(server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Connection: close" in head
    assert json.loads(body) == {"status": "ok"}


def test_stop_ends_every_thread() -> None:
    srv = HttpServer("127.0.0.1", 0)
    srv.start()
    idle = socket.create_connection(("127.0.0.1", srv.port))
    srv.stop()
    idle.close()
    assert _threads_named("segs-http") == 0
