"""The HTTP endpoint: /health, /ready, /metrics, 404, port 0, bind failure."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from segs.errors import SegsError
from segs.http import HttpError, HttpServer


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
