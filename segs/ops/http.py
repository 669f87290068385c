"""The supervisor's HTTP endpoint: ``/metrics``, ``/health`` (liveness), ``/ready``.

No dependency: one thread owns the listening socket and every connection until its request
has arrived whole; a fixed pool of handler threads then answers it with the stdlib request
handler. So an idle, slow or aborted client costs a file descriptor for at most
:data:`REQUEST_TIMEOUT_S`, never a thread, and the endpoint's threads are bounded whatever
clients do. Rules:

* a request (request line and headers) must arrive within ``REQUEST_TIMEOUT_S`` of the
  connect and fit in ``MAX_REQUEST_BYTES``, else the connection is closed;
* at most ``MAX_WAITING`` connections wait for their request; past that the oldest waiting
  one is closed, so a flood of idle sockets cannot lock out a scrape or a probe;
* one request per connection (HTTP/1.0 semantics, ``Connection: close``);
* a client that goes away (reset, broken pipe, timeout) is one debug line, never a
  traceback; requests are logged at debug level, never to stderr.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from segs.errors import SegsError
from segs.ops.logs import SAY_EVERY_S
from segs.ops.metrics import render_latest

log = logging.getLogger("segs.http")

Readiness = Callable[[], tuple[bool, dict[str, object]]]
"""Returns (ready, details); details name what is missing when not ready."""

REQUEST_TIMEOUT_S = 5.0
"""Time from connect until the request's headers are complete; also the write timeout."""
MAX_WAITING = 256
"""Connections waiting for their request; beyond it the oldest waiting one is closed."""
MAX_REQUEST_BYTES = 16 * 1024
"""Request line plus headers; a GET to this endpoint needs a few hundred bytes."""
HANDLER_THREADS = 8
"""Threads answering complete requests; each answer is quick (readiness is cached)."""
MAX_QUEUED = 256
"""Complete requests waiting for a handler thread; beyond it new ones are closed."""

_JSON = "application/json"
_POLL_S = 0.2


def _always_ready() -> tuple[bool, dict[str, object]]:
    return True, {}


class HttpError(SegsError):
    """The HTTP endpoint could not start (e.g. the port is already in use)."""


class _Conn:
    """An accepted connection whose request is still arriving."""

    __slots__ = ("addr", "fd", "head", "since", "sock", "waiting")

    def __init__(self, sock: socket.socket, addr: Any, since: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.since = since
        self.head = bytearray()
        self.waiting = True

    def complete(self) -> bool:
        return b"\r\n\r\n" in self.head or b"\n\n" in self.head


class _Handler(BaseHTTPRequestHandler):
    """Answers one request whose head was already read (``rfile`` is that head)."""

    server: Any  # the _Listener; typed loosely as socketserver's handler expects a server
    server_version = "segs-stream"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S  # applies to writes: the head is already in memory

    def __init__(self, sock: socket.socket, addr: Any, server: _Listener, head: bytes
                 ) -> None:
        self._head = head
        super().__init__(sock, addr, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self._head)

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
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Listener:
    """The accepting thread and the handler pool behind :class:`HttpServer`."""

    def __init__(self, sock: socket.socket, readiness: Readiness) -> None:
        self.sock = sock
        self.readiness = readiness
        self.server_address = sock.getsockname()
        self._stop = threading.Event()
        self._accept_warned = -SAY_EVERY_S
        self._waiting: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._queue: queue.Queue[_Conn | None] = queue.Queue(MAX_QUEUED)
        self._sel = selectors.DefaultSelector()
        self._threads = [threading.Thread(target=self._accept_loop, name="segs-http",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._handle_loop, name=f"segs-http-{i}",
                                           daemon=True) for i in range(HANDLER_THREADS)]

    def start(self) -> None:
        self.sock.setblocking(False)
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        for _ in range(HANDLER_THREADS):
            try:
                self._queue.put(None, timeout=0.1)
            except queue.Full:
                break  # the handlers also see the stop flag after their current request
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    # ---------------------------------------------------------------- accepting thread

    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    for key, _ in self._sel.select(_POLL_S):
                        if key.data is None:
                            self._accept()
                        else:
                            self._read(key.data)
                    self._expire(time.monotonic())
                except Exception:  # a bug must not end the endpoint nor spin
                    log.exception("http endpoint: unexpected error; serving on")
                    time.sleep(_POLL_S)
        finally:
            for conn in list(self._waiting.values()):
                self._drop(conn, "server stopping")
            self._sel.close()
            self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: retry after a pause
                now = time.monotonic()
                if now - self._accept_warned >= SAY_EVERY_S:
                    self._accept_warned = now
                    log.warning("http endpoint cannot accept connections: %s",
                                exc.strerror or exc)
                time.sleep(_POLL_S)
                return
            sock.setblocking(False)
            conn = _Conn(sock, addr, time.monotonic())
            self._waiting[conn.fd] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            while len(self._waiting) > MAX_WAITING:
                oldest = next(iter(self._waiting.values()))
                if not self._read(oldest):  # its request may be there, unread: serve it
                    self._drop(oldest, "too many connections waiting")

    def _read(self, conn: _Conn) -> bool:
        """Read what arrived; False when the connection is still waiting for its request."""
        if not conn.waiting:  # dropped earlier in this pass
            return True
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._drop(conn, f"client went away ({exc.strerror or exc})")
            return True
        if not data:
            self._drop(conn, "client closed the connection before its request")
            return True
        conn.head += data
        if conn.complete():
            self._unwait(conn)
            try:
                self._queue.put_nowait(conn)
            except queue.Full:
                self._close(conn, "too many requests queued")
            return True
        if len(conn.head) > MAX_REQUEST_BYTES:
            self._drop(conn, f"request head over {MAX_REQUEST_BYTES} bytes")
            return True
        return False

    def _expire(self, now: float) -> None:
        while self._waiting:
            oldest = next(iter(self._waiting.values()))
            if now - oldest.since < REQUEST_TIMEOUT_S:
                return
            self._drop(oldest, f"no complete request within {REQUEST_TIMEOUT_S:g} s")

    def _unwait(self, conn: _Conn) -> None:
        if conn.waiting:
            conn.waiting = False
            del self._waiting[conn.fd]
            self._sel.unregister(conn.sock)

    def _drop(self, conn: _Conn, why: str) -> None:
        self._unwait(conn)
        self._close(conn, why)

    @staticmethod
    def _close(conn: _Conn, why: str) -> None:
        log.debug("%s: connection closed: %s", conn.addr[0] if conn.addr else "?", why)
        conn.sock.close()

    # ---------------------------------------------------------------- handler threads

    def _handle_loop(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            if self._stop.is_set():
                conn.sock.close()
                continue
            self._handle(conn)

    def _handle(self, conn: _Conn) -> None:
        try:
            conn.sock.setblocking(True)
            _Handler(conn.sock, conn.addr, self, bytes(conn.head))
        except OSError as exc:  # reset, broken pipe, write timeout: the client's doing
            log.debug("%s: client went away: %s", conn.addr[0], exc.strerror or exc)
        except Exception:  # a bug here must not kill the thread nor bypass the log format
            log.exception("http request from %s failed", conn.addr[0])
        finally:
            conn.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class HttpServer:
    """Serves the endpoints on ``host:port`` from daemon threads; ``port=0`` picks a free one."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = 3002, readiness: Readiness | None = None
    ) -> None:
        self.host = host
        self._requested_port = port
        self._readiness: Readiness = readiness or _always_ready
        self._server: _Listener | None = None

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
            sock = _bind(self.host, self._requested_port)
        except OSError as exc:
            raise HttpError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}"
                " (is another segs-stream or service using the port? set PORT)"
            ) from exc
        self._server = _Listener(sock, self._readiness)
        self._server.start()
        log.info("http endpoint listening", extra={"host": self.host, "port": self.port})

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the port; safe to call twice or before start."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout_s)

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
