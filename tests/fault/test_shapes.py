"""Clock and data shapes: a silent partition, hour-late readings, one very hot meter, and a
very wide fleet.

- A partition that goes silent still closes its windows: after ``IDLE_ADVANCE`` of wall
  clock its watermark follows the clock, and its last windows are published.
- Readings an hour late (their window long closed and published) merge into the stored row,
  raise ``stream_late_readings_total`` and re-publish the window.
- One meter with a million readings in one minute: a single partition, a single cell.
- A million meters with one reading each: memory stays under the bound while every meter
  gets its row (checked exactly, two million rows with the 15-minute table).
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import UTC, datetime

import msgspec
import psycopg
import pytest

from segs.tools.local_servers import free_port
from segs.tools.simulator import SimMessage
from tests.fault.conftest import Fault
from tests.pipeline import read_topic
from tests.reference import RefAgg

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MINUTE = 60_000


def iso_ms(ms: int) -> str:
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def reading(meter: str, ts_ms: int, power: float, region: str = "north",
            energy: float = 0.01) -> bytes:
    return json.dumps({"meterId": meter, "region": region, "timestamp": iso_ms(ts_ms),
                       "powerKw": power, "energyKwh": energy},
                      separators=(",", ":")).encode()


def published(fault: Fault, topic: str) -> dict[tuple[str, int], dict[str, object]]:
    """Latest published aggregate per (meterId, windowStart ms)."""
    out = {}
    for m in read_topic(fault.kafka.bootstrap, topic):
        v = msgspec.json.decode(m.value())
        start = int(datetime.fromisoformat(v["windowStart"].replace("Z", "+00:00"))
                    .timestamp() * 1000)
        out[(v["meterId"], start)] = v
    return out


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_silent_partition_still_closes_its_windows(fault: Fault) -> None:
    now = int(time.time() * 1000)
    old = (now - 3 * MINUTE) // MINUTE * MINUTE + 30_000  # mid-window, three minutes ago
    svc = fault.service(workers=2).start()
    silent = [(f"silent-{i}".encode(), reading(f"silent-{i}", old + i, 1.0 + i), 5)
              for i in range(20)]
    messages = fault.produce(silent)
    fault.inject("partition silent")
    deadline = time.monotonic() + 40
    while True:  # the other partitions stay busy with fresh readings meanwhile
        t = int(time.time() * 1000)
        messages += fault.produce([(f"busy-{i}".encode(), reading(f"busy-{i}", t, 2.0), i % 5)
                                   for i in range(50)])
        got = published(fault, fault.topics.agg_1m)
        if all((f"silent-{i}", old // MINUTE * MINUTE) in got for i in range(20)):
            break
        assert time.monotonic() < deadline, "the silent partition's windows never closed"
        time.sleep(1)
    fault.verify(messages, svc)
    assert svc.stop() == 0


def test_hour_late_readings_update_the_stored_window(fault: Fault) -> None:
    port = free_port()
    svc = fault.service(workers=1, PORT=str(port)).start()
    assert svc.http_port() == port
    now = int(time.time() * 1000)
    hour_ago = (now - 60 * MINUTE) // MINUTE * MINUTE
    first = [(b"late-meter", reading("late-meter", hour_ago + i * 1000, 1.0), 0)
             for i in range(10)]
    first += [(b"late-meter", reading("late-meter", now - 1000 + i, 3.0), 0) for i in range(5)]
    messages = fault.produce(first)
    fault.verify(messages, svc)
    deadline = time.monotonic() + 30
    while ("late-meter", hour_ago) not in published(fault, fault.topics.agg_1m):
        assert time.monotonic() < deadline, "the hour-old window was never published"
        time.sleep(0.5)
    late_before = scrape(port, "stream_late_readings_total")

    late = [(b"late-meter", reading("late-meter", hour_ago + 30_000 + i, 7.5), 0)
            for i in range(25)]
    messages += fault.produce(late)
    fault.inject("readings an hour late", len(late))
    fault.verify(messages, svc)
    with psycopg.connect(fault.db_url) as conn:
        row = conn.execute("SELECT sample_count, max_power FROM aggregates_1m "
                           "WHERE meter_id = 'late-meter' AND window_start = to_timestamp(%s)",
                           (hour_ago / 1000,)).fetchone()
    assert row == (35, 7.5)
    deadline = time.monotonic() + 30
    while scrape(port, "stream_late_readings_total") < late_before + len(late):
        assert time.monotonic() < deadline, "stream_late_readings_total did not rise"
        time.sleep(0.5)
    while published(fault, fault.topics.agg_1m)[("late-meter", hour_ago)]["readingCount"] != 35:
        assert time.monotonic() < deadline, "the updated window was not re-published"
        time.sleep(0.5)
    assert svc.stop() == 0


HOT_READINGS = 1_000_000


def test_one_meter_with_a_million_readings_in_one_window(fault: Fault) -> None:
    now = int(time.time() * 1000)
    start = (now - 5 * MINUTE) // MINUTE * MINUTE
    distinct = [reading("hot-meter", start + j * 59, 0.5 + j / 1000, energy=0.001 * (j % 7))
                for j in range(1000)]
    fault.rss_bound_kb = 450_000  # ~270 MB seen: full fetch queues of a busy partition
    # the million readings are 1,000 distinct ones sent 1,000 times each: counted as a
    # million messages, the shape this test is about, with DEDUPLICATE=off
    svc = fault.service(workers=2, DEDUPLICATE="off").start()
    t0 = time.monotonic()
    fault.produce(((b"hot-meter", distinct[i % 1000], None) for i in range(HOT_READINGS)),
                  keep=False)
    produce_s = time.monotonic() - t0
    fault.inject("one meter, 1,000,000 readings, one window")
    powers = [0.5 + j / 1000 for j in range(1000)]
    energies = [0.001 * (j % 7) for j in range(1000)]
    reps = HOT_READINGS // 1000
    agg = RefAgg(count=HOT_READINGS, power_sum=reps * sum(powers),
                 avg=sum(powers) / 1000, max=max(powers), min=min(powers),
                 energy_sum=reps * sum(energies), region="north", partition=None)
    want = {60: {("hot-meter", start): agg}, 900: {("hot-meter", start // 900_000 * 900_000): agg}}
    t0 = time.monotonic()
    fault.verify(Unheld(HOT_READINGS), svc, want=want, invalid=[], timeout_s=240)
    fault.entry.notes.append(f"produced in {produce_s:.1f} s, stored "
                             f"{time.monotonic() - t0:.1f} s later")
    assert svc.stop() == 0


WIDE_METERS = 1_000_000


def test_a_million_meters_with_one_reading_each(fault: Fault) -> None:
    now = int(time.time() * 1000)
    start = (now - 5 * MINUTE) // MINUTE * MINUTE
    fault.rss_bound_kb = 1_200_000  # a million meters: ids, slots and cells per worker
    svc = fault.service(workers=2).start()
    template = (b'{"meterId":"W%07d","region":"east","timestamp":"' +
                iso_ms(start + 1234).encode() + b'","powerKw":%d.25,"energyKwh":0.5}')
    t0 = time.monotonic()
    fault.produce((((b"W%07d" % i), template % (i, i % 97), None)
                   for i in range(WIDE_METERS)), keep=False)
    produce_s = time.monotonic() - t0
    fault.inject("1,000,000 meters, one reading each")
    t0 = time.monotonic()
    fault.verify(Unheld(WIDE_METERS), svc, invalid=[], timeout_s=300,
                 exact=lambda url: _wide_rows_exact(url, start))
    fault.entry.notes.append(f"produced in {produce_s:.1f} s, stored and checked "
                             f"{time.monotonic() - t0:.1f} s later")
    assert svc.stop() == 0


def _wide_rows_exact(db_url: str, start_ms: int) -> tuple[int, int]:
    """Meter ``W%07d`` % i read once, (i % 97) + 0.25 kW and 0.5 kWh, in the windows of
    ``start_ms``: each table holds exactly one such row per meter, and nothing else. Checked
    in SQL, row by row: the ids are distinct (one window start, and the primary key), all
    in range, and every row equals its reference exactly (every figure is a binary fraction)."""
    with psycopg.connect(db_url) as conn:
        for table, size_ms in (("aggregates_1m", MINUTE), ("aggregates_15m", 15 * MINUTE)):
            rows, good = conn.execute(
                f"SELECT count(*), count(*) FILTER (WHERE meter_id ~ '^W[0-9]{{7}}$'"
                f" AND substr(meter_id, 2)::int < %(n)s"
                f" AND (extract(epoch FROM window_start) * 1000)::int8 = %(start)s"
                f" AND window_end - window_start = make_interval(secs => %(size)s / 1000)"
                f" AND sample_count = 1 AND region = 'east' AND total_energy = 0.5"
                f" AND avg_power = (substr(meter_id, 2)::int %% 97)::float8 + 0.25"
                f" AND max_power = avg_power AND min_power = avg_power) FROM {table}",
                {"n": WIDE_METERS, "start": start_ms // size_ms * size_ms,
                 "size": size_ms}).fetchone() or (0, 0)
            assert rows == good == WIDE_METERS, (
                f"{table}: {rows} rows, {good} as the reference, want {WIDE_METERS}")
    return WIDE_METERS, 2 * WIDE_METERS


class Unheld(list[SimMessage]):
    """Stands for ``n`` produced messages without holding them (only len() is used)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n
