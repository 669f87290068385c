"""A database as the original stack's init script left it, written from its description
(issue 19), for the adoption tests.

``aggregates_1m`` / ``aggregates_15m`` with the original's columns and types, no key (the
older script; the newer one adds ``UNIQUE (meter_id, window_start)``), history rows on
aligned windows days in the past, two rows sharing a key, one row without a reading count.
On TimescaleDB also: a ``raw_readings`` hypertable, both aggregate tables hypertables (1 and
7 days), compression segmented by meter and region with its policies (7 / 30 days) and some
chunks compressed, retention policies (30 / 365 days), and the continuous aggregates
``cagg_1m`` over ``raw_readings`` and ``cagg_15m`` over ``aggregates_1m``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from segs.checkpoint.migrate import timescale
from segs.tools.local_servers import LocalPostgres

DAY_MS = 86_400_000
DUPLICATE_AVG = 9.0
# history ends 20 days ago, whatever the date: within the original's 30-day retention (whose
# job TimescaleDB runs as soon as migrate adds it) and past its 7-day compression
T_MS = (int(time.time() * 1000) // DAY_MS - 20) * DAY_MS

_TABLE = """
CREATE TABLE {name} (
    meter_id VARCHAR(50) NOT NULL,
    region VARCHAR(100) NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    avg_power_kw DECIMAL(12, 4),
    max_power_kw DECIMAL(12, 4),
    min_power_kw DECIMAL(12, 4),
    energy_kwh_sum DECIMAL(12, 4),
    voltage_avg DECIMAL(8, 2),
    current_avg DECIMAL(8, 2),
    reading_count INTEGER,
    created_at TIMESTAMPTZ DEFAULT NOW()
{unique})
"""

_TIMESCALE = """
CREATE TABLE raw_readings (
    reading_id BIGSERIAL, meter_id VARCHAR(50) NOT NULL, region VARCHAR(100) NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL, power_kw DECIMAL(12, 4), energy_kwh DECIMAL(12, 6),
    voltage DECIMAL(8, 2), current DECIMAL(8, 2), created_at TIMESTAMPTZ DEFAULT NOW());
SELECT create_hypertable('raw_readings', 'timestamp', chunk_time_interval => INTERVAL '1 day');
SELECT create_hypertable('aggregates_1m', 'window_start', chunk_time_interval => INTERVAL '1 day',
                         migrate_data => true);
SELECT create_hypertable('aggregates_15m', 'window_start',
                         chunk_time_interval => INTERVAL '7 days', migrate_data => true);
CREATE INDEX idx_agg_1m_meter ON aggregates_1m (meter_id, window_start DESC);
CREATE INDEX idx_agg_15m_meter ON aggregates_15m (meter_id, window_start DESC);
CREATE MATERIALIZED VIEW cagg_1m WITH (timescaledb.continuous) AS
SELECT meter_id, region, time_bucket('1 minute', timestamp) AS window_start,
       AVG(power_kw) AS avg_power_kw, MAX(power_kw) AS max_power_kw,
       MIN(power_kw) AS min_power_kw, AVG(voltage) AS voltage_avg, COUNT(*) AS reading_count
FROM raw_readings GROUP BY meter_id, region, time_bucket('1 minute', timestamp);
CREATE MATERIALIZED VIEW cagg_15m WITH (timescaledb.continuous) AS
SELECT meter_id, region, time_bucket('15 minutes', window_start) AS window_start,
       AVG(avg_power_kw) AS avg_power_kw, MAX(max_power_kw) AS max_power_kw,
       MIN(min_power_kw) AS min_power_kw, SUM(energy_kwh_sum) AS energy_kwh_sum,
       AVG(voltage_avg) AS voltage_avg, SUM(reading_count) AS reading_count
FROM aggregates_1m GROUP BY meter_id, region, time_bucket('15 minutes', window_start);
SELECT add_retention_policy('raw_readings', INTERVAL '7 days');
SELECT add_retention_policy('aggregates_1m', INTERVAL '30 days');
SELECT add_retention_policy('aggregates_15m', INTERVAL '365 days');
ALTER TABLE aggregates_1m SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'meter_id,region',
    timescaledb.compress_orderby = 'window_start DESC');
ALTER TABLE aggregates_15m SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'meter_id,region',
    timescaledb.compress_orderby = 'window_start DESC');
SELECT add_compression_policy('aggregates_1m', INTERVAL '7 days');
SELECT add_compression_policy('aggregates_15m', INTERVAL '30 days');
SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('aggregates_1m') c;
SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('aggregates_15m') c;
"""

# (meter, window start ms, avg, max, min, energy, voltage_avg, reading_count, created_at ms)
Row = tuple[str, int, float | None, float, float, float, float | None, int | None, int]


def history() -> dict[str, list[Row]]:
    """The rows the original stack stored, per table: 3 meters × 4 days of a few windows."""
    out: dict[str, list[Row]] = {"aggregates_1m": [], "aggregates_15m": []}
    for table, size_ms in (("aggregates_1m", 60_000), ("aggregates_15m", 900_000)):
        for m in range(3):
            for day in range(4):
                for w in range(3):
                    start = T_MS - day * DAY_MS + w * size_ms
                    avg = round(1.5 + m + 0.1234 * w, 4)
                    out[table].append((f"MTR-{m:05d}", start, avg, avg + 1, avg - 1,
                                       round(avg / 60, 4), 230.0 + w, 6, T_MS))
    # two rows for one key (the older script had no key); the later-created one stays
    first = out["aggregates_1m"][0]
    out["aggregates_1m"].append((*first[:2], DUPLICATE_AVG, 9.0, 9.0, 9.0, 240.0, 3,
                                 first[8] - 1000))
    # a row without a reading count: empty history for merging
    out["aggregates_15m"][1] = (*out["aggregates_15m"][1][:7], None, T_MS)
    return out


def create(url: str, *, timescaledb: bool, unique: bool = False) -> dict[str, list[Row]]:
    """Make the original stack's tables (and, with ``timescaledb``, the rest) at ``url``
    and fill them with :func:`history`; returns it."""
    rows = history()
    key = ",\n    UNIQUE (meter_id, window_start)" if unique else ""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET client_min_messages = error")
        for table in rows:
            conn.execute(_TABLE.format(name=table, unique=key).encode())
        for table, table_rows in rows.items():
            if unique:  # the newer script upserted: one row per key
                table_rows[:] = [r for r in table_rows if r[2] != DUPLICATE_AVG]
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} (meter_id, region, window_start, avg_power_kw,"
                    " max_power_kw, min_power_kw, energy_kwh_sum, voltage_avg, reading_count,"
                    " created_at) VALUES (%s, 'north', to_timestamp(%s / 1000.0), %s, %s, %s,"
                    " %s, %s, %s, to_timestamp(%s / 1000.0))".encode(),
                    table_rows)
        if timescaledb:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            for statement in filter(str.strip, _TIMESCALE.split(";\n")):
                conn.execute(statement.encode())  # one at a time: caggs refuse a transaction
    return rows


@contextmanager
def adopted(request: pytest.FixtureRequest,
            variant: str) -> Iterator[tuple[str, dict[str, list[Row]]]]:
    """(URL, history) of a database the original stack made, not migrated yet: ``variant``
    "plain" or "plain, unique key" is a plain PostgreSQL cluster of its own, closed after;
    "timescaledb" is the session's server (skipped when it does not preload the extension)."""
    if variant.startswith("plain"):
        pg = LocalPostgres(preload=False).start()
        try:
            yield pg.url, create(pg.url, timescaledb=False, unique="unique" in variant)
        finally:
            pg.close()
        return
    url = request.getfixturevalue("db_url")
    with psycopg.connect(url) as conn:
        ts = timescale(conn)
    if ts.available is None or not ts.preloaded:
        pytest.skip("the test server does not preload timescaledb")
    yield url, create(url, timescaledb=True)
