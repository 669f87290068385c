"""On a database adopted from the original stack, readings its narrow columns cannot hold
never stall a partition.

Its tables keep ``meter_id VARCHAR(50)`` and the figures under the original names as
``DECIMAL(12,4)`` / ``DECIMAL(8,2)`` (TimescaleDB and the continuous aggregate over
``aggregates_1m`` refuse type changes). A meter id of 51-64 characters is valid by the
contract but does not fit; it is dead-lettered as ``meter_id_too_long_for_table``. A figure
that does not fit a DECIMAL column is written NULL there and exactly under the contract's
names. The real ``segs-stream run`` streams both kinds through, with the fixture of
:mod:`tests.original_stack`, on plain PostgreSQL and (when preloaded) TimescaleDB.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from segs.checkpoint.migrate import migrate
from segs.checkpoint.sink import _STATEMENTS, Sink, StoredTypes
from tests import original_stack
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import (
    TABLES,
    Service,
    end_offsets,
    read_topic,
    service_env,
    stored,
    wait_consumed,
)
from tests.reference import RefAgg, aggregate, distinct, parse_reading

pytestmark = pytest.mark.integration

LONG_IDS = ("L" * 60, "é" * 55)  # 51-64 characters: valid by the contract, not for VARCHAR(50)
# meter → the readings (minute of the window, powerKw, energyKwh, voltage) of each phase
PHASE_1: dict[str, list[tuple[int, float, float, float | None]]] = {
    "MTR-HUGE": [(1, 2e8, 6e7, 2e6), (1, 3e8, 6e7, 2.5e6)],  # every original figure overflows
    "MTR-PEAK": [(2, 1.0, 0.5, 230.0)],  # fits, until phase 2 merges a peak into it
    "MTR-15M": [(3, 5.0, 4e7, 231.0), (4, 5.0, 4e7, None)],  # 1-minute sums fit, 15 do not
    "MTR-EDGE-IN": [(5, 99999999.9999, 0.0, 999999.99)],  # the largest that fit
    "MTR-EDGE-OUT": [(5, 99999999.99995, 0.0, 999999.995)],  # round up past the column
    "F" * 50: [(6, 2.0, 0.1, 229.0)],  # as long as the column: stored
    LONG_IDS[0]: [(m, 1.5, 0.1, 230.0) for m in range(5)],
    LONG_IDS[1]: [(m, 1.5, 0.1, None) for m in range(3)],
    "X" * 65: [(7, 1.0, 0.1, None)],  # past the contract: bad_value
    **{f"MTR-{i:02d}": [(m, 1.0 + i + m / 7, 0.01 * (m + 1), 228.0 + m) for m in range(15)]
       for i in range(6)},
}
PHASE_2: dict[str, list[tuple[int, float, float, float | None]]] = {
    "MTR-PEAK": [(2, 1.5e8, 0.5, 230.0)],  # merged into its stored 1-minute row
    "MTR-15M": [(9, 5.0, 4e7, 232.0)],  # merged into its stored 15-minute row: 1.2e8 kWh
    LONG_IDS[0]: [(10, 1.5, 0.1, 230.0)],
    **{f"MTR-{i:02d}": [(14, 2.0, 0.02, None)] for i in range(6)},
}
METERS = sorted({*PHASE_1, *PHASE_2})  # a meter's place: its partition and region


@pytest.fixture(params=["plain", "timescaledb"])
def adopted(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a database the original stack made (not migrated yet)."""
    with original_stack.adopted(request, request.param) as (url, _):
        yield url


def _produce(bootstrap: str, topic: str, window_ms: int,
             phase: dict[str, list[tuple[int, float, float, float | None]]],
             first_ms: int = 0) -> list[bytes]:
    """The phase's readings, each meter on a partition of its own choosing, interleaved so
    that valid readings follow the long ids on their partitions; returns the values. A
    reading's millisecond is ``first_ms`` + its round: phases differ in it, so a reading of
    phase 2 is not a re-send of one of phase 1 (DEDUPLICATE)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    values: list[bytes] = []
    rounds = max(len(r) for r in phase.values())
    for k in range(rounds):
        for meter in sorted(phase):
            if k >= len(phase[meter]):
                continue
            n = METERS.index(meter)
            minute, power, energy, voltage = phase[meter][k]
            obj: dict[str, Any] = {
                "meterId": meter, "region": f"region-{n % 3}", "powerKw": power,
                "energyKwh": energy,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(
                    (window_ms + minute * 60_000) // 1000)) + f".{first_ms + k:03d}Z"}
            if voltage is not None:
                obj["voltage"] = voltage
            value = json.dumps(obj, ensure_ascii=False).encode()
            producer.produce(topic, value, key=meter.encode(), partition=n % 6)
            values.append(value)
    assert producer.flush(30) == 0
    return values


def _fit(x: float | None, precision: int, scale: int) -> Decimal | None:
    """``x`` as a NUMERIC(precision, scale) column stores it (PostgreSQL converts a double
    with 15 significant digits, then rounds half away from zero), or None where it does
    not fit."""
    if x is None:
        return None
    d = Decimal(f"{x:.15g}").quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    return d if abs(d) < 10 ** (precision - scale) else None


def _original_names(url: str, table: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, avg_power_kw,"
            f" max_power_kw, min_power_kw, energy_kwh_sum, voltage_avg, \"count\","
            f" voltage_sum, voltage_count FROM {table}").fetchall()
    return {(r[0], int(r[1])): tuple(r[2:]) for r in rows}


def _same_figure(got: Decimal | None, want: Decimal | None, exact: float | None,
                 scale: int) -> bool:
    """The stored original figure is the reference's as the column keeps it: NULL where it
    does not fit, else rounded to ``scale`` decimals (the last bit of a sum may differ)."""
    if want is None or got is None:
        return got is want
    assert exact is not None
    return abs(float(got) - exact) <= 0.5 * 10.0 ** -scale + 1e-12 * abs(exact)


def test_long_ids_and_oversized_figures_never_stall_an_adopted_database(
        adopted: str, kafka_server: KafkaServer, topics: Topics, tmp_path: Path) -> None:
    url = adopted
    now_ms = int(time.time() * 1000)
    window_ms = now_ms - now_ms % 900_000 - 900_000  # the last 15-minute window closed
    env = service_env(kafka_server.bootstrap, url, topics.env())
    svc = Service(env, tmp_path / "service.log").start()
    try:
        values = _produce(kafka_server.bootstrap, topics.input, window_ms, PHASE_1)
        wait_consumed(url, topics.group, topics.input,
                      end_offsets(kafka_server.bootstrap, topics.input), timeout_s=60,
                      service=svc)
        values += _produce(kafka_server.bootstrap, topics.input, window_ms, PHASE_2, first_ms=500)
        wait_consumed(url, topics.group, topics.input,
                      end_offsets(kafka_server.bootstrap, topics.input), timeout_s=60,
                      service=svc)
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port()}/metrics",
                                    timeout=10) as resp:
            scraped = resp.read().decode()
        assert svc.stop() == 0, svc.log_text()[-3000:]
    finally:
        svc.kill()
    log = svc.log_text()
    assert "value too long" not in log and "numeric field overflow" not in log, log[-3000:]
    assert "pausing intake" not in log, log[-3000:]
    assert "meter ids longer than 50 characters are dead-lettered" in log

    # the long ids in the dead-letter topic with their own reason; the 65 characters as ever
    parsed = [parse_reading(v, now_ms, meter_id_max=50, region_max=100) for v in values]
    want_dlq = sorted((json.loads(v)["meterId"], p) for v, p in zip(values, parsed, strict=True)
                      if isinstance(p, str))
    letters = read_topic(kafka_server.bootstrap, topics.dlq)
    got_dlq = sorted((json.loads(m.value())["meterId"], dict(m.headers())["segs.error"].decode())
                     for m in letters)
    assert got_dlq == want_dlq
    assert {r for _, r in got_dlq} == {"meter_id_too_long_for_table", "bad_value"}
    assert sum(r == "meter_id_too_long_for_table" for _, r in got_dlq) == 9
    details = {dict(m.headers())["segs.detail"].decode() for m in letters
               if dict(m.headers())["segs.error"] == b"meter_id_too_long_for_table"}
    assert details == {f"meterId has {n} characters; the database's meter_id column holds "
                       "at most 50" for n in (60, 55)}
    assert 'stream_invalid_messages_total{reason="meter_id_too_long_for_table"} 9.0' in scraped

    # every other reading stored exactly under the contract's names, next to the history
    valid = [p for p in parsed if not isinstance(p, str)]
    history = original_stack.history()
    for size, table in TABLES.items():
        ref: dict[tuple[str, int], RefAgg] = aggregate(distinct(valid), size)
        got = stored(url, size)
        old = {(m, w) for m, w, *_ in history[table]}
        assert got.keys() - old == ref.keys(), table
        originals = _original_names(url, table)
        for key, r in ref.items():
            count, avg, mx, mn, energy, region, span = got[key]
            assert (count, mx, mn, region, span) == (r.count, r.max, r.min, r.region, size)
            assert avg == pytest.approx(r.avg, rel=1e-9)
            assert energy == pytest.approx(r.energy_sum, rel=1e-9, abs=1e-12)
            # … and under the original names as their DECIMAL columns hold them, or NULL
            o = originals[key]
            volt = r.voltage_avg
            assert o[5] == r.count and o[7] == r.voltage_count, (table, key)
            assert o[6] == pytest.approx(r.voltage_sum, rel=1e-9), (table, key)
            for got_fig, exact, scale in ((o[0], r.avg, 4), (o[1], r.max, 4), (o[2], r.min, 4),
                                          (o[3], r.energy_sum, 4), (o[4], volt, 2)):
                want = _fit(exact, 12 if scale == 4 else 8, scale)
                assert _same_figure(got_fig, want, exact, scale), (table, key, o, r)

    # the figures chosen to overflow read NULL under the original names, exact under ours
    w1 = window_ms + 60_000
    o1, o15 = _original_names(url, "aggregates_1m"), _original_names(url, "aggregates_15m")
    assert o1[("MTR-HUGE", w1)][:5] == (None,) * 5
    assert o15[("MTR-HUGE", window_ms)][:5] == (None,) * 5
    assert stored(url, 60)[("MTR-HUGE", w1)][1:5] == (2.5e8, 3e8, 2e8, 1.2e8)
    assert o1[("MTR-PEAK", window_ms + 120_000)][:4] == (
        Decimal("75000000.5000"), None, Decimal("1.0000"), Decimal("1.0000"))
    assert o1[("MTR-15M", window_ms + 180_000)][3] == Decimal("40000000.0000")
    assert o15[("MTR-15M", window_ms)][3] is None  # 1.2e8 kWh: merged past the column
    assert stored(url, 900)[("MTR-15M", window_ms)][4] == 1.2e8
    edge_in = o1[("MTR-EDGE-IN", window_ms + 300_000)]
    assert edge_in[:3] == (Decimal("99999999.9999"),) * 3 and edge_in[4] == Decimal("999999.99")
    assert o1[("MTR-EDGE-OUT", window_ms + 300_000)][:5] == (None, None, None,
                                                              Decimal("0.0000"), None)
    assert not math.isnan(stored(url, 60)[("MTR-EDGE-OUT", window_ms + 300_000)][1])

    with psycopg.connect(url, autocommit=True) as conn:  # what the original built still works
        if conn.execute("SELECT to_regclass('cagg_15m')").fetchone() != (None,):
            conn.execute("CALL refresh_continuous_aggregate('cagg_15m', NULL, NULL)")
            row = conn.execute("SELECT energy_kwh_sum FROM cagg_15m WHERE meter_id = 'MTR-15M'"
                               ).fetchone()
            assert row == (Decimal("120000000.0000"),)  # its own sum of three 1-minute rows


def test_a_database_segs_stream_made_keeps_every_name_and_figure_unguarded(
        db_url: str) -> None:
    """TEXT names and double precision figures: no limit learnt, the default statements."""
    migrate(db_url)
    sink = Sink(db_url, consumer_group="g", topic="t")
    sink.open()
    try:
        assert sink.stored_types() == StoredTypes()
        assert sink._sql is _STATEMENTS
    finally:
        sink.close()
