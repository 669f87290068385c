"""`segs-stream migrate` adopts a database made by the original stack, and the service runs on it.

The fixture (:mod:`tests.original_stack`) is that stack's tables and history, on a plain
PostgreSQL cluster of its own and, when TimescaleDB is installed, on the session server with
hypertables, compressed chunks, policies and continuous aggregates over them. Migrate must
succeed, keep every row readable under both name sets, say in one line per table what cannot
merge exactly, do nothing the second time; then late readings merge into adopted windows
(compressed ones too) and a stream on top is stored exactly.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from segs.checkpoint.sink import Sink
from tests import original_stack
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import SEGS, TABLES, expected, process_all, simulate, stored

pytestmark = pytest.mark.integration

SIZE_MS = {"aggregates_1m": 60_000, "aggregates_15m": 900_000}


@pytest.fixture(params=["plain", "plain, unique key", "timescaledb"])
def adopted(request: pytest.FixtureRequest,
            postgres_server: PostgresServer) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(variant, url, history) of a database the original stack made."""
    with original_stack.adopted(request, request.param) as (url, rows):
        yield request.param, url, rows


def _migrate(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "POSTGRES_"))}
    env.update(POSTGRES_URL=url, LOG_FORMAT="text", LOG_LEVEL="info")
    return subprocess.run([SEGS, "--env-file", "/dev/null", "migrate"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _d(x: float | None, places: int = 4) -> Decimal | None:
    return None if x is None else Decimal(str(x)).quantize(Decimal(1).scaleb(-places))


def test_migrate_adopts_the_original_database_and_the_service_runs_on_it(
        adopted: tuple[str, str, dict[str, Any]], kafka_server: KafkaServer, topics: Topics,
        tmp_path: Path) -> None:
    variant, url, history = adopted
    first = _migrate(url)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = [ln for ln in first.stderr.splitlines() if "adopted aggregates_" in ln]
    assert len(lines) == 2, first.stderr
    dups = 0 if "unique" in variant else 1
    assert f"{dups} duplicate (meter_id, window_start) rows moved" in lines[1], lines
    assert "1 rows without avg_power_kw or reading_count" in lines[0], lines

    # every row of the history, under both names; the duplicate created first moved aside
    with psycopg.connect(url) as conn:
        for table, rows in history.items():
            kept: dict[tuple[str, int], original_stack.Row] = {}
            for r in sorted(rows, key=lambda r: r[8]):  # the latest-created of a key wins
                kept[(r[0], r[1])] = r
            got = {(m, int(w)): rest for m, w, *rest in conn.execute(
                f"SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8,"
                f" avg_power_kw, max_power_kw, min_power_kw, energy_kwh_sum, voltage_avg,"
                f" reading_count, current_avg, avg_power, max_power, min_power, total_energy,"
                f" sample_count, \"count\", power_sum, published, region,"
                f" (extract(epoch FROM window_end - window_start) * 1000)::int8"
                f" FROM {table}").fetchall()}
            assert got.keys() == kept.keys(), table
            for key, r in kept.items():
                _, _, avg, mx, mn, energy, volt, count, _created = r
                g = got[key]
                assert g[:6] == [_d(avg), _d(mx), _d(mn), _d(energy), _d(volt, 2), count]
                assert g[6] is None  # current_avg
                assert g[7:12] == [float(_d(avg) or 0), float(_d(mx) or 0),  # type: ignore
                                   float(_d(mn) or 0), float(_d(energy) or 0),
                                   count if count is not None else 0], (table, key, g)
                assert g[12] == count and g[14] is True and g[15] == "north"
                assert g[13] == pytest.approx(float(_d(avg) or 0) * (count or 0))
                assert g[16] == SIZE_MS[table]
            moved = conn.execute(
                f"SELECT avg_power_kw FROM {table}_adopted_duplicates").fetchall() \
                if conn.execute("SELECT to_regclass(%s)", (f"{table}_adopted_duplicates",)
                                ).fetchone() != (None,) else []
            want_moved = [(Decimal("9.0000"),)] if table == "aggregates_1m" and dups else []
            assert moved == want_moved, table

    second = _migrate(url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "schema versions applied: none" in second.stdout
    assert "adopted" not in second.stderr and "converted" not in second.stderr, second.stderr

    if variant == "timescaledb":  # what the original built on top still works
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CALL refresh_continuous_aggregate('cagg_15m', NULL, NULL)")
            assert conn.execute("SELECT count(*) FROM cagg_15m").fetchone() != (0,)
            compressed = conn.execute(
                "SELECT count(*) FROM timescaledb_information.chunks"
                " WHERE hypertable_name = 'aggregates_1m' AND is_compressed").fetchone()
            assert compressed is not None and compressed[0] > 0
            # the hypertables' own tables hold no rows: no values kept for older ones, so
            # rows routed into chunks are not converted (chunks keep theirs, for their rows)
            assert conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE atthasmissing AND attrelid IN"
                " ('aggregates_1m'::regclass, 'aggregates_15m'::regclass)").fetchone() == (0,)

    # late readings for adopted windows (in compressed chunks on TimescaleDB) merge: two of
    # 2 kW (sum 4) and 230 V, into the 1-minute row of 6 readings and the 15-minute row that
    # had no reading count
    m0, t0 = "MTR-00000", original_stack.T_MS
    t15 = history["aggregates_15m"][1][1]
    sink = Sink(url, consumer_group="g", topic="t")
    sink.open()
    try:
        sink.commit({60: [(m0, "north", t0, 2, 4.0, 2.0, 2.0, 0.1, t0 + 5000, 0, 460.0, 2)],
                     900: [(m0, "north", t15, 2, 4.0, 2.0, 2.0, 0.1, t15 + 5000, 0, 460.0, 2)]},
                    [], {0: (None, 1, None)})
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        one = conn.execute(
            "SELECT sample_count, reading_count, \"count\", power_sum, avg_power, voltage_avg,"
            " max_power, published FROM aggregates_1m WHERE meter_id = %s"
            " AND window_start = to_timestamp(%s / 1000.0)", (m0, t0)).fetchone()
        fifteen = conn.execute(
            "SELECT sample_count, reading_count, power_sum, avg_power, avg_power_kw"
            " FROM aggregates_15m WHERE meter_id = %s"
            " AND window_start = to_timestamp(%s / 1000.0)", (m0, t15)).fetchone()
    assert one is not None and fifteen is not None
    assert one[:3] == (8, 8, 8) and one[3] == pytest.approx(1.5 * 6 + 4)
    assert one[4] == pytest.approx((1.5 * 6 + 4) / 8)
    assert float(one[5]) == pytest.approx((230.0 * 6 + 460) / 8)
    assert one[6] == 2.5 and one[7] is False  # max of the history; to be published again
    assert fifteen[:3] == (2, 2, 4.0) and fifteen[3] == 2.0 and float(fifteen[4]) == 2.0

    # a stream on top: its windows (now, far from the history) are stored exactly
    messages = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=30, count=900, seed=23, duplicate_fraction=0.02,
                        out_of_order_fraction=0.05, invalid_fraction=0.01)
    process_all(kafka_server.bootstrap, url, topics, tmp_path / "service.log")
    want, _ = expected(messages, int(time.time() * 1000))
    for size, ref in want.items():
        got = stored(url, size)
        old = {(m, w) for m, w, *_ in history[TABLES[size]]}
        assert got.keys() - old == ref.keys(), TABLES[size]
        for key, r in ref.items():
            count, avg, mx, mn, energy, region, span = got[key]
            assert (count, mx, mn, region, span) == (r.count, r.max, r.min, r.region, size)
            assert avg == pytest.approx(r.avg, rel=1e-9)
            assert energy == pytest.approx(r.energy_sum, rel=1e-9, abs=1e-12)
