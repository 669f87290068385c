"""Harness for end-to-end tests: the real service as a subprocess, and exact comparisons.

Used by the integration and fault tiers: simulate into a fresh topic (keeping the file of
what was produced), start `segs-stream run` against the real servers, wait until every
message is covered by a stored position, then compare the database with the reference
aggregates computed from the file by :mod:`tests.reference`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from segs.tools import harness

# SEGS, end_offsets and stored_positions: the fault tests import them from here too
from segs.tools.harness import SEGS, end_offsets, stored_positions  # noqa: F401
from segs.tools.procfs import status_kb
from segs.tools.simulator import SimMessage, SimulatorOptions, produce, read_file
from segs.windows.sizes import SIZES
from tests.reference import (
    RefAgg,
    RefRegional,
    aggregate,
    distinct,
    parse_reading,
    regional,
    timestamp_ms,
)

TABLES = {size.seconds: size.table for size in SIZES}


# TimescaleDB runs a new retention job at once: with the defaults (30 / 365 days) it would
# drop the chunks of any test data older than that while the test reads them.
NO_POLICIES = {"TIMESCALEDB_RETENTION_1M": "off", "TIMESCALEDB_RETENTION_15M": "off",
               "TIMESCALEDB_COMPRESS_AFTER_1M": "off", "TIMESCALEDB_COMPRESS_AFTER_15M": "off"}


def service_env(bootstrap: str, db_url: str, topics_env: dict[str, str],
                **extra: str) -> dict[str, str]:
    """The harness's environment with the tests' settings: quick flushes and idle advance,
    a 20 s shutdown, the service's own metrics folder, no TimescaleDB policies."""
    return harness.service_env(bootstrap, db_url, topics_env, **{
        "FLUSH_INTERVAL_1M": "1000", "IDLE_ADVANCE": "2", "SHUTDOWN_TIMEOUT": "20",
        "PROMETHEUS_MULTIPROC_DIR": "", **NO_POLICIES, **extra})


class Service(harness.Service):
    """The harness's service; a clean stop also proves the metrics folder it made is gone."""

    def stop(self, timeout_s: float | None = None) -> int:
        code = super().stop(timeout_s)
        if self.proc is not None and code >= 0:  # it ended itself, so it removed its folder
            own = Path(tempfile.gettempdir(), f"segs-stream-metrics-{self.proc.pid}")
            assert not own.exists(), f"{own} left behind"
        return code


def rss_kb(pid: int) -> int:
    """Resident memory of a process in kB (0 once it is gone)."""
    return status_kb(pid, "VmRSS")


def simulate(bootstrap: str, topic: str, path: Path, **options: Any) -> list[SimMessage]:
    """Produce with the simulator into ``topic``; return exactly what was produced."""
    opts = SimulatorOptions(**options)
    summary = produce(opts, {"bootstrap.servers": bootstrap}, topic, file=path,
                      progress=False)
    assert summary.delivery_errors == 0, summary.last_error
    return list(read_file(path))


def wait_consumed(db_url: str, group: str, topic: str, ends: dict[int, int],
                  timeout_s: float = 120, service: Service | None = None) -> None:
    """Wait until the stored positions cover every message of ``ends``."""
    deadline = time.monotonic() + timeout_s
    want = {p: o for p, o in ends.items() if o > 0}
    got: dict[int, int] = {}
    while time.monotonic() < deadline:
        got = stored_positions(db_url, group, topic)
        if all(got.get(p, 0) >= o for p, o in want.items()):
            return
        if service is not None and service.proc is not None and service.proc.poll() is not None:
            raise AssertionError(f"service exited with {service.proc.returncode}:\n"
                                 + service.log_text()[-3000:])
        time.sleep(0.5)
    raise AssertionError(f"positions {got} never reached {want}")


def process_all(bootstrap: str, db_url: str, topics: Any, log_path: Path,
                **env: str) -> Service:
    """Run the service until every message in the input topic is stored, then SIGTERM it
    (it must exit 0). ``topics`` is the :class:`tests.conftest.Topics` of the test."""
    svc = Service(service_env(bootstrap, db_url, topics.env(), **env), log_path).start()
    try:
        wait_consumed(db_url, topics.group, topics.input, end_offsets(bootstrap, topics.input),
                      service=svc)
        assert svc.stop() == 0, svc.log_text()[-2000:]
    finally:
        svc.kill()
    return svc


def expected(messages: Iterable[SimMessage], now_ms: int, *, deduplicate: bool = True) -> tuple[
        dict[int, dict[tuple[str, int], RefAgg]], list[tuple[SimMessage, str]]]:
    """Reference aggregates per window size, and the invalid messages with their reasons.
    ``deduplicate``: of the first reading of each identity (the service's default), else of
    every valid message (``DEDUPLICATE=off``)."""
    valid: list[dict[str, Any]] = []
    invalid: list[tuple[SimMessage, str]] = []
    for m in messages:
        parsed = parse_reading(m.value, now_ms)
        if isinstance(parsed, str):
            invalid.append((m, parsed))
        else:
            valid.append(parsed)
    counted = distinct(valid) if deduplicate else valid
    return {size: aggregate(counted, size) for size in TABLES}, invalid


def stored(db_url: str, size: int) -> dict[tuple[str, int], tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:  # one read: no transaction held
        rows = conn.execute(
            f"SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, sample_count, "
            f"avg_power, max_power, min_power, total_energy, region, "
            f"(extract(epoch FROM window_end - window_start))::int "
            f"FROM {TABLES[size]}").fetchall()
    return {(r[0], int(r[1])): r[2:] for r in rows}


def assert_exact(db_url: str, want: dict[int, dict[tuple[str, int], RefAgg]]) -> int:
    """The database equals the reference: counts/max/min exactly, sums to 1e-9 relative."""
    checked = 0
    for size, ref in want.items():
        got = stored(db_url, size)
        missing = ref.keys() - got.keys()
        extra = got.keys() - ref.keys()
        assert not missing and not extra, (
            f"{TABLES[size]}: {len(missing)} windows missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})")
        bad = []
        for key, r in ref.items():
            count, avg, mx, mn, energy, region, span = got[key]
            ok = (count == r.count and mx == r.max and mn == r.min and span == size
                  and region == r.region and _close(avg, r.avg) and _close(energy, r.energy_sum))
            if not ok:
                bad.append((key, got[key], r))
        assert not bad, f"{TABLES[size]}: {len(bad)} windows differ, e.g. {bad[:3]}"
        checked += sum(r.count for r in ref.values())
    return checked


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) or abs(a - b) < 1e-12


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30) -> list[Any]:
    """Every message currently in ``topic`` (all partitions), read from the beginning."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"segs-test-read-{time.time()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(md.partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                if m.error():
                    continue
                out.append(m)
                if m.offset() + 1 >= ends[m.partition()]:
                    todo.discard(m.partition())
        assert not todo, f"could not read {topic} partitions {todo} to the end"
        return out
    finally:
        c.close()


def stored_regional(db_url: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    """(region, window start ms) → (meter_count, total, avg, max, min, load, published)."""
    with psycopg.connect(db_url, autocommit=True) as conn:  # one read: no transaction held
        rows = conn.execute(
            "SELECT region, (extract(epoch FROM window_start) * 1000)::int8, meter_count,"
            " total_consumption, avg_consumption, max_consumption, min_consumption,"
            " load_percentage, published FROM aggregates_1m_regional").fetchall()
    return {(r[0], int(r[1])): tuple(r[2:]) for r in rows}


def regional_of_stored(db_url: str, caps: dict[str, float]) -> dict[tuple[str, int], RefRegional]:
    """The reference regional figures of the aggregates_1m rows stored now (bit-exact)."""
    with psycopg.connect(db_url, autocommit=True) as conn:  # one read: no transaction held
        rows = conn.execute(
            "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, sample_count,"
            " power_sum, max_power, region FROM aggregates_1m").fetchall()
    return regional({(m, int(s)): RefAgg(n, ps, ps / n, mx, 0.0, 0.0, region, None)
                     for m, s, n, ps, mx, region in rows}, caps)


def latest_regional(bootstrap: str, topic: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest message of each (key, window) on the regional topic, values parsed."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    msgs = sorted(read_topic(bootstrap, topic), key=lambda m: (m.partition(), m.offset()))
    for m in msgs:
        value = json.loads(m.value())
        assert m.key() == value["region"].encode()
        assert dict(m.headers() or []) == {"type": b"regional_1m_aggregate",
                                           "region": m.key()}
        out[(value["region"], timestamp_ms(value["timestamp"]) or 0)] = value
    return out


def _regional_diff(db_url: str, bootstrap: str, topic: str,
                   ref: dict[tuple[str, int], RefRegional], caps: dict[str, float]) -> str:
    """Why the table and the topic do not (yet) match the reference, or ''."""
    table = stored_regional(db_url)
    if table.keys() != ref.keys():
        return (f"table: {len(ref.keys() - table.keys())} region-windows missing, "
                f"{len(table.keys() - ref.keys())} unexpected")
    exact = regional_of_stored(db_url, caps)
    for key, r in ref.items():
        n, total, avg, mx, mn, load, published = table[key]
        e = exact[key]
        if (n, total, avg, mx, mn, load) != (e.meter_count, e.total, e.avg, e.max, e.min,
                                             e.load):
            return f"table {key}: {table[key]} is not the roll-up of the stored rows {e}"
        if not (n == r.meter_count and mx == r.max and _close(total, r.total)
                and _close(avg, r.avg) and _close(mn, r.min)
                and (load == r.load or _near_tie(r.total, caps, key[0]))):
            return f"table {key}: {table[key]} differs from the reference {r}"
        if not published:
            return f"table {key}: not published yet"
    latest = latest_regional(bootstrap, topic)
    if latest.keys() != ref.keys():
        return (f"topic: {len(ref.keys() - latest.keys())} region-windows missing, "
                f"{len(latest.keys() - ref.keys())} unexpected")
    for key, r in ref.items():
        v, row = latest[key], table[key]
        got = (v["meter_count"], v["total_consumption"], v["avg_consumption"],
               v["max_consumption"], v["min_consumption"], v["load_percentage"])
        if got != row[:6] or tuple(v["active_meters"]) != r.meters \
                or v["active_meters_omitted"] or v["windowStart"] != v["timestamp"]:
            return f"topic {key}: latest message {got} is not the table's {row[:6]}"
    return ""


def wait_regional(db_url: str, bootstrap: str, topic: str,
                  ref: dict[tuple[str, int], RefRegional], caps: dict[str, float],
                  timeout_s: float = 60) -> int:
    """Until every region-window of ``ref`` is in the table, equal to the roll-up of the
    stored rows bit for bit and to the reference (sums to 1e-9 relative), and the latest
    message of each on the topic carries the table's figures and the reference's meter
    list; the region-windows checked."""
    deadline = time.monotonic() + timeout_s
    while True:
        why = _regional_diff(db_url, bootstrap, topic, ref, caps)
        if not why:
            return len(ref)
        assert time.monotonic() < deadline, why
        time.sleep(1.0)


def _near_tie(total: float, caps: dict[str, float], region: str) -> bool:
    """A load this close to a rounding boundary may round either way from sums that differ
    in the last bits (the reference adds readings in another order)."""
    x = total / caps.get(region, 1_000_000.0) * 10_000
    return abs(x - math.floor(x) - 0.5) < 1e-6
