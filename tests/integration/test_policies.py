"""TimescaleDB policies follow the settings, and late readings merge into compressed chunks."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import psycopg
import pytest

from segs.checkpoint.migrate import Policies, migrate, timescale
from segs.checkpoint.sink import Sink
from segs.tools.local_servers import LocalPostgres

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
OLD_MS = (int(time.time() * 1000) // DAY_MS - 10) * DAY_MS  # older than 7 days, not 30


def _jobs(url: str) -> dict[tuple[str, str], str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT hypertable_name, proc_name, coalesce(config->>'drop_after',"
            " config->>'compress_after') FROM timescaledb_information.jobs"
            " WHERE hypertable_name IS NOT NULL").fetchall()
    return {(t, p): str(v) for t, p, v in rows}


@pytest.fixture
def ts_url(db_url: str) -> str:
    with psycopg.connect(db_url) as conn:
        ts = timescale(conn)
    if ts.available is None or not ts.preloaded:
        pytest.skip("the test server does not preload timescaledb")
    return db_url


def test_policies_follow_the_settings(ts_url: str) -> None:
    migrate(ts_url, Policies())
    assert _jobs(ts_url) == {
        ("aggregates_1m", "policy_retention"): "30 days",
        ("aggregates_1m", "policy_compression"): "7 days",
        ("aggregates_15m", "policy_retention"): "365 days",
        ("aggregates_15m", "policy_compression"): "30 days"}
    migrate(ts_url, Policies({"aggregates_1m": 0, "aggregates_15m": 400},
                             {"aggregates_1m": 2, "aggregates_15m": 0}))
    assert _jobs(ts_url) == {
        ("aggregates_1m", "policy_compression"): "2 days",
        ("aggregates_15m", "policy_retention"): "400 days"}
    migrate(ts_url)  # no policies given: left as they are
    assert len(_jobs(ts_url)) == 2
    with psycopg.connect(ts_url) as conn:
        segment = conn.execute(
            "SELECT attname FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'aggregates_1m' AND segmentby_column_index = 1"
        ).fetchall()
    assert segment == [("meter_id",)]


def test_a_late_reading_merges_exactly_into_a_compressed_chunk(ts_url: str) -> None:
    migrate(ts_url, Policies())
    sink = Sink(ts_url, consumer_group="g", topic="t")
    sink.open()
    try:
        rows = {60: [(f"m{m}", "north", OLD_MS, 2, 3.0, 2.0, 1.0, 0.5, OLD_MS + 1000, 0,
                      460.0, 2) for m in range(3)]}
        rows[900] = rows[60]
        sink.commit(rows, [], {0: (None, 10, None)})
        with psycopg.connect(ts_url, autocommit=True) as conn:
            for table in ("aggregates_1m", "aggregates_15m"):
                # the policy's job, which TimescaleDB runs at once, may have been first
                conn.execute("SELECT count(compress_chunk(c, if_not_compressed => true))"
                             " FROM show_chunks(%s::regclass) c", (table,))
                done = conn.execute(
                    "SELECT count(*) FROM timescaledb_information.chunks"
                    " WHERE hypertable_name = %s AND is_compressed", (table,)).fetchone()
                assert done == (1,)
        # the same window again: through the merge, and through the fresh insert that meets a
        # stored row and merges instead
        late = {60: [("m0", "south", OLD_MS, 1, 4.0, 4.0, 4.0, 0.25, OLD_MS + 2000, 1,
                      0.0, 0)]}
        late[900] = late[60]
        sink.commit(late, [], {0: (10, 11, None)})
        sink.commit({}, [], {0: (11, 12, None)}, fresh=late)
    finally:
        sink.close()
    with psycopg.connect(ts_url) as conn:
        for table in ("aggregates_1m", "aggregates_15m"):
            got = conn.execute(
                "SELECT sample_count, reading_count, \"count\", power_sum, avg_power,"
                " avg_power_kw, max_power_kw, min_power_kw, energy_kwh_sum, voltage_avg,"
                " region, published FROM " + table + " WHERE meter_id = 'm0'").fetchall()
            assert got == [(4, 4, 4, 11.0, 2.75, 2.75, 4.0, 1.0, 1.0, 230.0, "south", False)]
            others = conn.execute("SELECT count(*) FROM " + table
                                  + " WHERE sample_count = 2").fetchone()
            assert others == (2,)


@pytest.fixture
def plain_url() -> Iterator[str]:
    pg = LocalPostgres(preload=False).start()
    try:
        yield pg.url
    finally:
        pg.close()


def test_plain_postgresql_ignores_the_policies_with_one_line(
        plain_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="segs.migrate"):
        migrate(plain_url, Policies())
    said = [r for r in caplog.records if "TIMESCALEDB_RETENTION" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segs.migrate"):
        migrate(plain_url, Policies({"aggregates_1m": 0, "aggregates_15m": 0},
                                    {"aggregates_1m": 0, "aggregates_15m": 0}))
    assert not [r for r in caplog.records if "TIMESCALEDB_" in r.getMessage()]
