"""The supervisor's HTTP endpoint: ``/metrics``, ``/health`` (liveness), ``/ready``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread: no dependency, and a slow scrape never
blocks the supervisor loop. Requests are logged at debug level, never to stderr.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from segs.errors import SegsError
from segs.metrics import render_latest

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, object]]]
"""Returns (ready, details); details name what is missing when not ready."""

_JSON = "application/json"


def _always_ready() -> tuple[bool, dict[str, object]]:
    return True, {}


class HttpError(SegsError):
    """The HTTP endpoint could not start (e.g. the port is already in use)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], readiness: Readiness) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.readiness = readiness
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a reverse DNS lookup that can
        # stall start-up on hosts without DNS; the name is only used for CGI.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "segs-stream"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = render_latest()
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif path == "/ready":
            self._ready()
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "path": path})

    def _ready(self) -> None:
        try:
            ready, details = self.server.readiness()
        except Exception as exc:  # a failing probe means "not ready", never a dead endpoint
            log.warning("readiness check failed: %s", exc, exc_info=True)
            ready, details = False, {"error": f"readiness check failed: {exc}"}
        payload: dict[str, object] = {"status": "ready" if ready else "not ready", **details}
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        self._send_json(status, payload)

    def _send_json(self, status: HTTPStatus, payload: dict[str, object]) -> None:
        body = json.dumps(payload, default=str, separators=(",", ":")).encode()
        self._send(status, body, _JSON)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class HttpServer:
    """Serves the endpoints on ``host:port`` from a daemon thread; ``port=0`` picks a free one."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = 3002, readiness: Readiness | None = None
    ) -> None:
        self.host = host
        self._requested_port = port
        self._readiness: Readiness = readiness or _always_ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked), or the requested one before start."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve; raises :class:`HttpError` when the address cannot be bound."""
        if self._server is not None:
            return
        try:
            server = _Server((self.host, self._requested_port), self._readiness)
        except OSError as exc:
            raise HttpError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}"
                " (is another segs-stream or service using the port? set PORT)"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="segs-http",
            daemon=True,
        )
        self._thread.start()
        log.info("http endpoint listening", extra={"host": self.host, "port": self.port})

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the port; safe to call twice or before start."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
