"""The service harness, without servers: its environment, its reading of the log and of
/metrics, and when stored positions cover the input."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segs.errors import InfraError
from segs.tools.harness import Service, covered, service_env


def test_service_env_replaces_the_callers_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_TOPIC_INPUT", "mine")
    monkeypatch.setenv("POSTGRES_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/theirs")
    monkeypatch.setenv("SEGS_HARNESS_PROBE", "kept")
    env = service_env("127.0.0.1:9092", "postgresql://here/db", {"KAFKA_TOPIC_INPUT": "in"},
                      FLUSH_INTERVAL_1M="1000")
    assert env["KAFKA_TOPIC_INPUT"] == "in"
    assert env["POSTGRES_URL"] == "postgresql://here/db"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert env["SEGS_HARNESS_PROBE"] == "kept"
    assert (env["PORT"], env["LOG_FORMAT"], env["FLUSH_INTERVAL_1M"]) == ("0", "json", "1000")


def test_covered_ignores_empty_partitions() -> None:
    assert covered({0: 5, 1: 0}, {0: 5})
    assert not covered({0: 5, 1: 3}, {0: 5, 1: 2})


@pytest.fixture
def metrics_server() -> Iterator[int]:
    body = (b"# TYPE stream_messages_total counter\n"
            b'stream_messages_total{partition="0"} 3.0\n'
            b'stream_messages_total{partition="1"} 4.0\n'
            b"stream_messages_totally_else 100.0\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path in ("/metrics", "/ready") else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_port_from_the_log_then_metrics_and_ready(tmp_path: Path, metrics_server: int) -> None:
    log = tmp_path / "service.log"
    log.write_text(f'{{"msg": "serving /metrics, /health, /ready on 0.0.0.0:{metrics_server}"}}\n')
    svc = Service({}, log)
    assert svc.http_port() == metrics_server
    assert svc.metric("stream_messages_total") == 7.0
    svc.wait_ready(timeout_s=5)


def test_no_port_in_the_log_is_an_infra_error(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("starting\n")
    with pytest.raises(InfraError, match="never logged its HTTP port"):
        Service({}, log).http_port(timeout_s=0.3)
