"""The original stack's API gateway reads our tables: its queries, unchanged, give exact figures.

A simulated stream goes through the real service; then every query of the kind the gateway
of the Smart Energy Grid System sends (its telemetry, billing and operator endpoints: latest
reading, history, statistics, daily and monthly breakdowns, regional statistics, top
consumers, real-time regional load, consumption) runs as text with ``$n`` parameters passed
as strings, as node-postgres sends them, and every figure is compared with the same query
computed from the reference aggregates of :mod:`tests.reference`. On TimescaleDB (the
session server preloads it when installed) and on a plain PostgreSQL cluster of its own.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from segs.checkpoint.migrate import storage_mode, timescale
from segs.tools.local_servers import LocalPostgres
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import expected, process_all, simulate
from tests.reference import RefAgg

pytestmark = pytest.mark.integration

START_MS = 1_796_083_200_000 - 100 * 60_000  # 100 minutes before 2026-12-01T00:00Z: two days,
METER_ROWS = ("meter_id, region, window_start, avg_power_kw, max_power_kw, min_power_kw, "
              "energy_kwh_sum, voltage_avg")  # two months

LATEST = {  # getLatestReading: the shipped query reads `count`, a later one reading_count
    "count": f"SELECT {METER_ROWS}, count FROM aggregates_1m WHERE meter_id = $1 "
             "ORDER BY window_start DESC LIMIT 1",
    "reading_count": f"SELECT {METER_ROWS}, reading_count FROM aggregates_1m "
                     "WHERE meter_id = $1 ORDER BY window_start DESC LIMIT 1",
}
HISTORY = ("SELECT {cols}, reading_count FROM {table} WHERE meter_id = $1 "
           "AND window_start >= $2 AND window_start <= $3 ORDER BY window_start ASC")
STATS = ("SELECT SUM(energy_kwh_sum) as total_consumption_kwh, AVG(avg_power_kw) as avg_power_kw,"
         " MAX(max_power_kw) as max_power_kw, MIN(min_power_kw) as min_power_kw,"
         " SUM({count}) as data_points FROM aggregates_15m WHERE meter_id = $1"
         " AND window_start >= $2 AND window_start <= $3")
STATS_BETWEEN = ("SELECT SUM(energy_kwh_sum), AVG(avg_power_kw), MAX(max_power_kw), "
                 "MIN(min_power_kw), SUM(count) FROM aggregates_15m WHERE meter_id = $1 "
                 "AND window_start BETWEEN $2 AND $3")
DAILY = ("SELECT DATE(window_start) as date, SUM(energy_kwh_sum) as total_kwh,"
         " AVG(avg_power_kw) as avg_kw, MAX(max_power_kw) as peak_kw FROM aggregates_15m"
         " WHERE meter_id = $1 AND window_start >= $2 AND window_start <= $3"
         " GROUP BY DATE(window_start) ORDER BY date ASC")
MONTHLY = ("SELECT TO_CHAR(window_start, 'YYYY-MM') as month, SUM(energy_kwh_sum) as total_kwh,"
           " AVG(avg_power_kw) as avg_kw, MAX(max_power_kw) as peak_kw FROM aggregates_15m"
           " WHERE meter_id = $1 AND window_start >= $2 AND window_start <= $3"
           " GROUP BY TO_CHAR(window_start, 'YYYY-MM') ORDER BY month ASC")
REGIONAL = ("SELECT region, SUM(energy_kwh_sum) as total_consumption_kwh,"
            " COUNT(DISTINCT meter_id) as active_meters,"
            " SUM(energy_kwh_sum) / NULLIF(COUNT(DISTINCT meter_id), 0)"
            " as avg_consumption_per_meter, MAX(max_power_kw) as peak_load_kw"
            " FROM aggregates_15m WHERE region = $1 AND window_start >= $2"
            " AND window_start <= $3 GROUP BY region")
TOP = ("SELECT meter_id, SUM(energy_kwh_sum) as total_kwh, AVG(avg_power_kw) as avg_kw,"
       " ROW_NUMBER() OVER (ORDER BY SUM(energy_kwh_sum) DESC) as rank FROM aggregates_15m"
       " WHERE region = $1 AND window_start >= $2 AND window_start <= $3"
       " GROUP BY meter_id ORDER BY total_kwh DESC LIMIT $4")
REALTIME = ("SELECT region, SUM(avg_power_kw) as current_load_kw,"
            " COUNT(DISTINCT meter_id) as active_meters, MAX(window_start) as timestamp"
            " FROM aggregates_1m WHERE region = $1"
            " AND window_start >= NOW() - INTERVAL '5 minutes' GROUP BY region")
CONSUMPTION = ("SELECT COALESCE(SUM(avg_power_kw * (1.0/60.0)), 0) as total_consumption"
               " FROM aggregates_1m WHERE meter_id = $1 AND window_start >= $2"
               " AND window_start <= $3")

Ref = dict[tuple[str, int], RefAgg]


@pytest.fixture(params=["timescaledb", "plain"])
def database(request: pytest.FixtureRequest,
             postgres_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """A fresh database on the session server (TimescaleDB when installed; the test says
    which it got) or on a plain PostgreSQL cluster of its own."""
    if request.param == "plain":
        pg = LocalPostgres(preload=False).start()
        try:
            yield "plain", pg.url
        finally:
            pg.close()
        return
    db_url = request.getfixturevalue("db_url")
    with psycopg.connect(db_url) as conn:
        if timescale(conn).available is None:
            pytest.skip("timescaledb is not installed for the test server")
    yield "timescaledb", db_url


def _run(conn: psycopg.Connection[Any], query: str, *params: object) -> list[tuple[Any, ...]]:
    """``query`` exactly as the gateway sends it, its parameters as text (node-postgres)."""
    with psycopg.RawCursor(conn) as cur:
        cur.execute(query.encode(), [str(p) for p in params])
        return cur.fetchall()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _close(got: Any, want: float | None) -> bool:
    if want is None or got is None:
        return got is None and want is None
    got = float(got)
    return got == want or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


def _assert_row(got: tuple[Any, ...], want: tuple[Any, ...], what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ok = _close(g, w) if isinstance(w, float) or (w is None and not isinstance(g, str)) \
            else g == w
        assert ok, f"{what}: column {i}: got {g!r}, want {w!r} (row {got!r})"


def _assert_rows(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} rows, want {len(want)}"
    for g, w in zip(got, want, strict=True):
        _assert_row(g, w, what)


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _in(ref: Ref, lo: int, hi: int, keep: Callable[[str, RefAgg], bool]) -> list[
        tuple[str, int, RefAgg]]:
    return sorted((m, w, r) for (m, w), r in ref.items() if lo <= w <= hi and keep(m, r))


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _window_row(m: str, w: int, r: RefAgg) -> tuple[Any, ...]:
    return (m, r.region, _dt(w), r.avg, r.max, r.min, r.energy_sum, r.voltage_avg, r.count)


def test_gateway_queries_return_exact_figures(
        database: tuple[str, str], kafka_server: KafkaServer, topics: Topics,
        tmp_path: Path) -> None:
    kind, url = database
    messages = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=24, regions=3, count=2400, interval_s=120.0, start_ms=START_MS,
                        seed=19, duplicate_fraction=0.02, out_of_order_fraction=0.05,
                        late_fraction=0.02, invalid_fraction=0.01, anomaly_fraction=0.0)
    process_all(kafka_server.bootstrap, url, topics, tmp_path / "service.log")
    with psycopg.connect(url) as conn:
        mode = storage_mode(conn)
    assert mode.startswith({"plain": "plain PostgreSQL", "timescaledb": "timescaledb "}[kind]) \
        and "plain tables" not in mode, mode
    want, _ = expected(messages, int(time.time() * 1000))
    ref_1m, ref_15m = want[60], want[900]
    assert {d.month for _, w in ref_15m for d in [_dt(w).date()]} == {11, 12}

    meters = sorted({m for m, _ in ref_15m})
    regions = sorted({r.region for r in ref_15m.values()})
    lo = min(w for _, w in ref_1m)
    hi = max(w for _, w in ref_1m)
    mid = lo + (hi - lo) // 2
    ranges = [(lo, hi), (lo, mid), (mid, hi)]
    with psycopg.connect(url, options="-c TimeZone=UTC") as conn:
        for meter in meters[:6]:
            # latest reading, both count names
            m_rows = [(w, r) for (m, w), r in ref_1m.items() if m == meter]
            w, r = max(m_rows, key=lambda x: x[0])
            for query in LATEST.values():
                _assert_rows(_run(conn, query, meter), [_window_row(meter, w, r)],
                             f"latest {meter}")
            for a, b in ranges:
                for table, ref in (("aggregates_1m", ref_1m), ("aggregates_15m", ref_15m)):
                    rows = _in(ref, a, b, lambda m, _r, meter=meter: m == meter)
                    _assert_rows(
                        _run(conn, HISTORY.format(cols=METER_ROWS, table=table), meter,
                             _iso(a), _iso(b)),
                        [_window_row(*x) for x in rows], f"history {table} {meter}")
                rows15 = [r for _, _, r in _in(ref_15m, a, b, lambda m, _r, meter=meter:
                                               m == meter)]
                stats = (math.fsum(r.energy_sum for r in rows15),
                         _mean([r.avg for r in rows15]), max(r.max for r in rows15),
                         min(r.min for r in rows15), sum(r.count for r in rows15))
                for count in ("count", "reading_count"):
                    _assert_rows(_run(conn, STATS.format(count=count), meter, _iso(a), _iso(b)),
                                 [stats], f"stats {meter}")
                _assert_rows(_run(conn, STATS_BETWEEN, meter, _iso(a), _iso(b)), [stats],
                             f"stats between {meter}")
                for query, key in ((DAILY, lambda ms: _dt(ms).date()),
                                   (MONTHLY, lambda ms: _dt(ms).strftime("%Y-%m"))):
                    groups: dict[date | str, list[RefAgg]] = defaultdict(list)
                    for _, ws, r in _in(ref_15m, a, b, lambda m, _r, meter=meter: m == meter):
                        groups[key(ws)].append(r)
                    _assert_rows(_run(conn, query, meter, _iso(a), _iso(b)),
                                 [(k, math.fsum(r.energy_sum for r in g), _mean([r.avg for r in g]),
                                   max(r.max for r in g)) for k, g in sorted(groups.items())],
                                 f"breakdown {meter}")
                rows1 = [r for _, _, r in _in(ref_1m, a, b, lambda m, _r, meter=meter:
                                              m == meter)]
                _assert_rows(_run(conn, CONSUMPTION, meter, _iso(a), _iso(b)),
                             [(math.fsum(r.avg * (1.0 / 60.0) for r in rows1),)],
                             f"consumption {meter}")
        for region in regions:
            for a, b in ranges:
                rows = _in(ref_15m, a, b, lambda _m, r, region=region: r.region == region)
                total = math.fsum(r.energy_sum for _, _, r in rows)
                active = len({m for m, _, _ in rows})
                _assert_rows(_run(conn, REGIONAL, region, _iso(a), _iso(b)),
                             [(region, total, active, total / active,
                               max(r.max for _, _, r in rows))], f"regional {region}")
                per: dict[str, list[RefAgg]] = defaultdict(list)
                for m, _, r in rows:
                    per[m].append(r)
                ranked = sorted(((math.fsum(r.energy_sum for r in g), m, _mean([r.avg for r in g]))
                                 for m, g in per.items()), key=lambda x: -x[0])
                got = _run(conn, TOP, region, _iso(a), _iso(b), 5)
                assert [g[3] for g in got] == list(range(1, min(5, len(ranked)) + 1))
                _assert_rows([g[1:3] for g in got], [(t, avg) for t, _, avg in ranked[:5]],
                             f"top {region}")
                assert {g[0] for g in got} <= set(per)
            with conn.transaction():  # NOW() is the transaction's start
                now = conn.execute("SELECT now()").fetchone()
                assert now is not None
                since = int(now[0].timestamp() * 1000) - 300_000
                recent = [(m, w, r) for (m, w), r in ref_1m.items()
                          if r.region == region and w >= since]
                want_rt = [(region, math.fsum(r.avg for _, _, r in recent),
                            len({m for m, _, _ in recent}), _dt(max(w for _, w, _ in recent)))
                           ] if recent else []
                _assert_rows(_run(conn, REALTIME, region), want_rt, f"realtime {region}")
