"""`segs-stream run`: migrations, the HTTP endpoint, and N worker processes kept alive.

Order of start-up: Prometheus multiprocess folder prepared (before any metric is counted
and before any worker is spawned) → migrations applied (retried while the database is
still coming up) → HTTP server → workers spawned with the ``spawn`` start method (never
``fork``: workers hold librdkafka clients) → ``READY=1`` to systemd once every worker runs.

Signals only set a flag. On SIGTERM/SIGINT the supervisor forwards SIGTERM to every worker,
waits up to ``SHUTDOWN_TIMEOUT`` for their final checkpoints, kills what is left, and exits
0 only if every worker finished its checkpoint. A second Ctrl+C stops at once. A worker that
dies is restarted with capped exponential back-off; its partitions resume from the
positions stored in the database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from segs.checkpoint.migrate import migrate
from segs.config import Settings
from segs.errors import DatabaseError, SchemaError
from segs.intake.decode import NATIVE
from segs.ops import metrics, systemd
from segs.ops.http import HttpServer
from segs.ops.readiness import ServerCheck
from segs.publish.topics import ensure_topics
from segs.runtime.state import WorkerState
from segs.runtime.worker import worker_main

log = logging.getLogger("segs.supervisor")

_BACKOFF_MAX_S = 30.0


@dataclass
class Slot:
    """One worker position: its current process and its restart bookkeeping."""

    index: int
    process: BaseProcess | None = None
    restarts: int = 0
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, settings: Settings, *, workers: int | None = None) -> None:
        self.s = settings
        self.n = workers or settings.workers
        self.ctx = multiprocessing.get_context("spawn")
        self.status: Any = self.ctx.Array("i", self.n, lock=False)
        self.slots = [Slot(i) for i in range(self.n)]
        self.stop_requested = 0
        self.http: HttpServer | None = None
        self.servers = ServerCheck(settings)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self._install_signals()
        self._migrate_with_retry()
        if not self.stop_requested:
            ensure_topics(self.s, should_stop=lambda: bool(self.stop_requested))
        if self.stop_requested:
            return 0
        self.servers.start()
        self.http = HttpServer(self.s.http_host, self.s.http_port, self.readiness)
        self.http.start()
        log.info("serving /metrics, /health, /ready on %s:%d", self.s.http_host,
                 self.http.port)
        if not NATIVE:  # see segs/intake/decode.py
            log.warning("decoder: segs.intake._fastscan is not built (no C compiler at install), "
                        "so messages are decoded in Python, about 2.5x slower")
        for slot in self.slots:
            self._spawn(slot)
        try:
            return self._watch()
        finally:
            self.http.stop()
            self.servers.stop()

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self.stop_requested += 1
            if self.stop_requested > 1 and signum == signal.SIGINT:
                for slot in self.slots:
                    if slot.process is not None and slot.process.pid:
                        os.kill(slot.process.pid, signal.SIGKILL)
                os._exit(130)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _migrate_with_retry(self, budget_s: float = 60.0) -> None:
        """Migrate, retrying only while the database cannot be reached: a migration the
        server refused (:class:`SchemaError`) ends the start at once with its line."""
        deadline = time.monotonic() + budget_s
        delay = 0.5
        while True:
            try:
                result = migrate(self.s.postgres_url.get(), self.s.policies())
                log.info("schema ready (%s); applied %s", result.mode,
                         ", ".join(result.applied) or "nothing new")
                return
            except DatabaseError as exc:
                if (isinstance(exc, SchemaError) or time.monotonic() + delay > deadline
                        or self.stop_requested):
                    raise
                log.warning("database not ready (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spawn(self, slot: Slot) -> None:
        self.status[slot.index] = WorkerState.STARTING
        proc = self.ctx.Process(target=worker_main, args=(self.s, slot.index, self.status),
                                name=f"segs-worker-{slot.index}", daemon=False)
        proc.start()
        slot.process = proc
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %s)", slot.index, proc.pid)

    def _watch(self) -> int:
        watchdog = systemd.watchdog_interval_s()
        next_watchdog = 0.0
        announced = False
        while not self.stop_requested:
            now = time.monotonic()
            for slot in self.slots:
                self._tend(slot, now)
            ready, _ = self.readiness(check_servers=False)
            if ready and not announced:
                systemd.ready()
                announced = True
                log.info("all %d workers running", self.n)
            if watchdog and now >= next_watchdog and self._alive():
                systemd.watchdog()
                next_watchdog = now + watchdog / 2
            time.sleep(0.2)
        return self._stop_all()

    def _alive(self) -> bool:
        return all(s.process is not None and s.process.is_alive() for s in self.slots
                   if s.restart_at == 0.0)

    def _tend(self, slot: Slot, now: float) -> None:
        proc = slot.process
        if proc is not None and proc.exitcode is None:
            if now - slot.started_at > 60 and slot.restarts:
                slot.restarts = 0  # ran long enough: forget earlier crashes
            return
        if proc is not None:
            log.error("worker %d (pid %s) exited with code %s", slot.index, proc.pid,
                      proc.exitcode)
            if proc.pid:
                metrics.mark_dead(proc.pid)
            proc.close()
            slot.process = None
            delay = min(_BACKOFF_MAX_S, 0.5 * 2 ** slot.restarts)
            slot.restart_at = now + delay
            slot.restarts += 1
            log.info("restarting worker %d in %.1f s", slot.index, delay)
            return
        if now >= slot.restart_at:
            slot.restart_at = 0.0
            metrics.WORKER_RESTARTS.inc()
            self._spawn(slot)

    def _stop_all(self) -> int:
        systemd.stopping()
        log.info("stopping %d workers", self.n)
        procs = [s.process for s in self.slots if s.process is not None]
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.s.shutdown_timeout_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        code = 0
        for proc in procs:
            if proc.exitcode is None:
                log.error("worker pid %s did not stop within %g s; killing it", proc.pid,
                          self.s.shutdown_timeout_s)
                proc.kill()
                proc.join(5)
                code = 1
            elif proc.exitcode not in (0, -signal.SIGTERM):
                # -SIGTERM: the signal came before the worker installed its handler (it was
                # still importing), so it had consumed nothing and there is nothing to save
                code = 1
            if proc.pid:
                metrics.mark_dead(proc.pid)
        log.info("stopped (exit code %d)", code)
        return code

    # ------------------------------------------------------------------ readiness

    def readiness(self, check_servers: bool = True) -> tuple[bool, dict[str, object]]:
        """Workers from the shared status array; servers from the background check's last
        answer (``checked_s_ago`` says how old it is), so a call never waits on a server."""
        states = [WorkerState(self.status[i]).label for i in range(self.n)]
        missing: list[str] = [f"worker {i} is {st}" for i, st in enumerate(states)
                              if st != WorkerState.RUNNING.label]
        details: dict[str, object] = {"workers": states, "missing": missing}
        if check_servers:
            found, age = self.servers.latest()
            missing.extend(found)
            details["checked_s_ago"] = None if age is None else round(age, 1)
        return not missing, details


def prepare_metrics_dir() -> tuple[str, bool]:
    """The Prometheus multiprocess folder, and whether it is this run's own to remove at exit.

    ``PROMETHEUS_MULTIPROC_DIR`` when set (the operator's, kept); else a folder named by
    this pid in ``$RUNTIME_DIRECTORY`` (systemd's, which systemd removes) or in the temp
    folder (removed by :func:`remove_metrics_dir` when the run ends).
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    base = given or os.path.join(os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir(),
                                 f"segs-stream-metrics-{os.getpid()}")
    metrics.prepare_multiprocess_dir(base)
    return base, not given


def remove_metrics_dir(path: str) -> None:
    """Remove this run's own metrics folder (its workers have exited: nothing writes it)."""
    shutil.rmtree(path, ignore_errors=True)
