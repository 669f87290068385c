"""The fault tier's harness: one :class:`Fault` per test, and a ledger of what was injected.

Every scenario goes through :meth:`Fault.verify`, which waits until the stored positions
cover every input message, then asserts the three things each fault test promises:

1. the database equals the reference aggregates of everything produced, exactly
   (:func:`tests.pipeline.assert_exact`);
2. the dead-letter topic holds exactly the invalid messages, each with the reason code of
   :mod:`tests.reference`;
3. no worker's resident memory went above the bound (sampled from ``/proc/PID/status``
   every half second by :class:`RssMonitor` while the test ran).

Everything a test starts — services, background producers, samplers, stopped servers —
is stopped or restarted by the fixtures, also when the test fails. The ledger adds up
faults injected, readings checked and durations; the terminal summary prints it, and
``SEGS_FAULT_REPORT=path`` writes it as JSON (the commit message of a full run quotes the numbers).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from segs.tools.simulator import SimMessage
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import (
    Service,
    assert_exact,
    end_offsets,
    expected,
    read_topic,
    rss_kb,
    service_env,
    simulate,
    stored_positions,
    wait_consumed,
)
from tests.reference import RefAgg

# Simulated traffic of every scenario: duplicates, disorder, late and invalid messages included.
SIM = dict(meters=300, regions=4, anomaly_fraction=0.002, duplicate_fraction=0.01,
           out_of_order_fraction=0.01, late_fraction=0.01, invalid_fraction=0.01)

# Resident memory one worker may use (kB). A worker streaming the scenarios below peaks
# near 100 MB (numpy, librdkafka, psycopg, windows); a leak or unbounded intake shows here.
RSS_BOUND_KB = 300_000

Want = dict[int, dict[tuple[str, int], RefAgg]]


# --------------------------------------------------------------------------- the ledger


@dataclass
class Entry:
    test: str
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: int = 0
    readings: int = 0
    invalid: int = 0
    windows: int = 0
    mismatches: int = 0
    max_rss_kb: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class Ledger:
    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def totals(self) -> dict[str, Any]:
        faults: collections.Counter[str] = collections.Counter()
        for e in self.entries:
            faults.update(e.faults)
        return {
            "tests": len(self.entries),
            "faults": dict(sorted(faults.items())),
            "faults_total": sum(faults.values()),
            "messages": sum(e.messages for e in self.entries),
            "readings_checked": sum(e.readings for e in self.entries),
            "invalid_checked": sum(e.invalid for e in self.entries),
            "windows_checked": sum(e.windows for e in self.entries),
            "mismatches": sum(e.mismatches for e in self.entries),
            "max_rss_kb": max((e.max_rss_kb for e in self.entries), default=0),
            "seconds": round(sum(e.seconds for e in self.entries), 1),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "totals": self.totals(),
            "tests": [{**e.__dict__, "faults": dict(e.faults), "seconds": round(e.seconds, 1)}
                      for e in self.entries],
        }


LEDGER = Ledger()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not LEDGER.entries:
        return
    tr = terminalreporter
    tr.section("fault injection ledger")
    for e in LEDGER.entries:
        faults = ", ".join(f"{k}×{v}" for k, v in sorted(e.faults.items())) or "-"
        tr.write_line(f"{e.test:<58} {e.seconds:6.1f} s  readings {e.readings:>9,}  "
                      f"invalid {e.invalid:>5,}  rss {e.max_rss_kb // 1024:>4} MB  "
                      f"faults: {faults}")
        if e.notes:
            tr.write_line("    " + "; ".join(e.notes))
    tr.write_line("totals: " + json.dumps(LEDGER.totals()))
    out = os.environ.get("SEGS_FAULT_REPORT")
    if out:
        Path(out).write_text(json.dumps(LEDGER.as_json(), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- memory


class RssMonitor:
    """Samples VmRSS of every worker of the given services until stopped."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.services: list[Service] = []
        self.peak_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)
        self._interval_s = interval_s
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def sample(self) -> None:
        for svc in list(self.services):
            if svc.proc is None or svc.proc.poll() is not None:
                continue
            for pid in svc.worker_pids():
                kb = rss_kb(pid)
                if kb > self.peak_kb.get(pid, 0):
                    self.peak_kb[pid] = kb

    @property
    def peak(self) -> int:
        return max(self.peak_kb.values(), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- the harness


@dataclass
class Fault:
    kafka: KafkaServer
    postgres: PostgresServer
    db_url: str
    topics: Topics
    tmp: Path
    entry: Entry
    rss: RssMonitor
    rss_bound_kb: int = RSS_BOUND_KB
    services: list[Service] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    on_cleanup: list[Callable[[], None]] = field(default_factory=list)

    # ---------------------------------------------------------------- the service

    def service(self, workers: int = 2, name: str = "service", **env: str) -> Service:
        svc = Service(service_env(self.kafka.bootstrap, self.db_url, self.topics.env(), **env),
                      self.tmp / f"{name}.log", workers=workers)
        self.services.append(svc)
        self.rss.services.append(svc)
        return svc

    def inject(self, kind: str, n: int = 1) -> None:
        """Count a fault in the ledger."""
        self.entry.faults[kind] += n

    def wait_workers(self, svc: Service, n: int, timeout_s: float = 60) -> list[int]:
        """Until ``svc`` runs ``n`` workers; their pids."""
        return svc.wait_workers(n, timeout_s)

    def wait_log(self, svc: Service, text: str, timeout_s: float = 60, *,
                 count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while svc.log_text().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} never logged ×{count}"
            time.sleep(0.1)

    def wait_progress(self, timeout_s: float = 60, *, at_least: int = 1) -> dict[int, int]:
        """Until the service has stored positions covering ``at_least`` messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            pos = stored_positions(self.db_url, self.topics.group, self.topics.input)
            if sum(pos.values()) >= at_least:
                return pos
            assert time.monotonic() < deadline, f"stored positions stuck at {pos}"
            time.sleep(0.1)

    # ---------------------------------------------------------------- input

    def stream(self, count: int, rate: float, **overrides: object
               ) -> Callable[[], list[SimMessage]]:
        """Simulate in the background; the returned call joins and gives the messages."""
        result: list[SimMessage] = []
        errors: list[BaseException] = []
        opts = {**SIM, "seed": 11, **overrides, "count": count, "rate": rate}
        path = self.tmp / f"sim-{len(self.threads)}.jsonl"

        def target() -> None:
            try:
                result.extend(simulate(self.kafka.bootstrap, self.topics.input, path, **opts))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=target, name="simulator", daemon=True)
        self.threads.append(t)
        t.start()

        def join() -> list[SimMessage]:
            t.join(300)
            assert not t.is_alive(), "the simulator did not finish"
            if errors:
                raise errors[0]
            return result

        return join

    def produce(self, messages: Iterable[tuple[bytes | None, bytes | None, int | None]],
                *, keep: bool = True) -> list[SimMessage]:
        """Produce (key, value, partition or None) as they are; what was produced (or
        nothing, with ``keep=False``, for runs too large to hold)."""
        return produce_raw(self.kafka.bootstrap, self.topics.input, messages, keep=keep)

    # ---------------------------------------------------------------- verification

    def verify(self, messages: list[SimMessage], service: Service | None = None, *,
               want: Want | None = None, invalid: list[tuple[SimMessage, str]] | None = None,
               replays: bool = False, timeout_s: float = 120,
               exact: Callable[[str], tuple[int, int]] | None = None) -> int:
        """Wait for every message to be stored, then assert DB, DLQ and memory; readings.
        ``exact`` (given the database URL, returns readings and windows checked) stands for
        ``want`` where the reference is a formula the database can check row by row itself:
        two million rows compared in Python take a minute of CI."""
        ends = end_offsets(self.kafka.bootstrap, self.topics.input)
        assert sum(ends.values()) == len(messages), "the input topic holds other messages"
        t0 = time.monotonic()
        wait_consumed(self.db_url, self.topics.group, self.topics.input, ends,
                      timeout_s=timeout_s, service=service)
        t1 = time.monotonic()
        if want is None and exact is None:
            want, invalid = expected(messages, int(time.time() * 1000))
        assert invalid is not None
        self.entry.messages += len(messages)
        try:
            if exact is not None:
                checked, windows = exact(self.db_url)
            else:
                assert want is not None
                checked = assert_exact(self.db_url, want) // len(want)  # in both tables
                windows = sum(len(w) for w in want.values())
        except AssertionError:
            self.entry.mismatches += 1
            raise
        self.entry.readings += checked
        self.entry.windows += windows
        self.assert_dlq(invalid, replays=replays)
        self.assert_memory()
        self.entry.notes.append(f"verify: waited {t1 - t0:.1f} s, checked "
                                f"{time.monotonic() - t1:.1f} s")
        return checked

    def verify_state(self, want: Want, invalid: list[tuple[SimMessage, str]]) -> None:
        """The checks of :meth:`verify` on what is stored now, without the ledger's counts."""
        try:
            assert_exact(self.db_url, want)
        except AssertionError:
            self.entry.mismatches += 1
            raise
        self.assert_dlq(invalid, count=False)

    def assert_dlq(self, invalid: list[tuple[SimMessage, str]], *,
                   replays: bool = False, count: bool = True) -> None:
        """The dead-letter topic holds exactly the invalid input messages.

        Each dead letter names its source (``segs.source`` = topic/partition/offset), a
        stable id: the set of sources must be exactly the input offsets whose message the
        reference rejects, each with the same key, value and reason. Like every output
        topic the DLQ is at-least-once, so a worker killed before its checkpoint may repeat
        dead letters of the messages it re-reads: ``replays=True`` allows such identical
        repeats (only tests that kill a worker pass it); otherwise there are none.
        """
        dlq = read_topic(self.kafka.bootstrap, self.topics.dlq)
        by_source: dict[str, tuple[bytes | None, bytes, str]] = {}
        repeats = 0
        for m in dlq:
            headers = dict(m.headers())
            letter = (m.key(), m.value(), headers["segs.error"].decode())
            source = headers["segs.source"].decode()
            assert source.startswith(self.topics.input + "/"), source
            if source in by_source:
                assert by_source[source] == letter, f"{source}: two different dead letters"
                repeats += 1
            by_source[source] = letter
        got = collections.Counter(by_source.values())
        want = collections.Counter((m.key, m.value, reason) for m, reason in invalid)
        if got != want:
            self.entry.mismatches += 1
        assert got == want, (f"DLQ: {sum((got - want).values())} unexpected "
                             f"(e.g. {list(got - want)[:3]}), {sum((want - got).values())} "
                             f"missing (e.g. {list(want - got)[:3]})")
        self.check_sources(by_source)
        assert replays or not repeats, f"{repeats} dead letters repeated without a crash"
        if count:
            self.entry.invalid += len(invalid)

    def check_sources(self, by_source: dict[str, tuple[bytes | None, bytes, str]]) -> None:
        """Each dead letter's source offset holds that very message in the input topic."""
        if not by_source:
            return
        inputs = {f"{m.topic()}/{m.partition()}/{m.offset()}": (m.key(), m.value())
                  for m in read_topic(self.kafka.bootstrap, self.topics.input, timeout_s=120)}
        for source, (key, value, _) in by_source.items():
            assert inputs.get(source) == (key, value), f"{source} is not that message"

    def assert_memory(self) -> None:
        self.rss.sample()
        self.entry.max_rss_kb = max(self.entry.max_rss_kb, self.rss.peak)
        assert self.rss.peak, "no worker memory sample was taken"
        assert self.rss.peak < self.rss_bound_kb, (
            f"a worker reached {self.rss.peak} kB resident, bound {self.rss_bound_kb} kB")

    def assert_no_crash(self, svc: Service) -> None:
        text = svc.log_text()
        assert "exited with code" not in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


def produce_raw(bootstrap: str, topic: str,
                messages: Iterable[tuple[bytes | None, bytes | None, int | None]],
                *, keep: bool = True, **config: Any) -> list[SimMessage]:
    """A tight produce loop; returns the messages as :class:`SimMessage` (kind 'raw')."""
    failed: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(err.str())

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                  "queue.buffering.max.messages": 500_000, "compression.type": "lz4",
                  "message.max.bytes": 2_000_000, "enable.idempotence": True,
                  "on_delivery": on_delivery, **config})
    out: list[SimMessage] = []
    produce, poll = p.produce, p.poll
    for key, value, partition in messages:
        while True:
            try:
                if partition is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, partition)
                break
            except BufferError:
                poll(0.05)
        if keep:
            out.append(SimMessage(key, value, "raw", None))  # type: ignore[arg-type]
    left = p.flush(60)
    assert not left and not failed, f"{left} undelivered, errors {failed[:3]}"
    return out


@pytest.fixture
def fault(request: pytest.FixtureRequest, kafka_server: KafkaServer,
          postgres_server: PostgresServer, db_url: str, topics: Topics,
          tmp_path: Path) -> Iterator[Fault]:
    entry = Entry(request.node.name)
    rss = RssMonitor()
    f = Fault(kafka_server, postgres_server, db_url, topics, tmp_path, entry, rss)
    t0 = time.monotonic()
    try:
        yield f
    finally:
        for undo in reversed(f.on_cleanup):
            with contextlib.suppress(Exception):
                undo()
        for svc in f.services:
            svc.kill()
        rss.stop()
        for t in f.threads:
            t.join(60)
        entry.seconds = time.monotonic() - t0
        entry.max_rss_kb = max(entry.max_rss_kb, rss.peak)
        LEDGER.entries.append(entry)


def wait_checkpoint_blocked(conn: psycopg.Connection, timeout_s: float = 30) -> int:
    """Until a service backend waits on a lock of stream_positions inside its checkpoint
    (``conn`` in autocommit, so each look is fresh); that backend's pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND state = 'active' "
            "AND query LIKE '%stream_positions%' LIMIT 1").fetchone()
        if row:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError("no checkpoint reached its positions")
