"""Migrations against the real PostgreSQL server."""

from __future__ import annotations

import psycopg
import pytest

from segs.checkpoint.migrate import migrate, migration_files, timescale

pytestmark = pytest.mark.integration


def test_migrate_creates_tables_and_is_idempotent(db_url: str) -> None:
    first = migrate(db_url)
    assert first.applied == [v for v, _ in migration_files()]
    second = migrate(db_url)
    assert second.applied == []
    assert second.already == first.applied
    with psycopg.connect(db_url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'aggregates_15m'")}
    assert {"aggregates_1m", "aggregates_15m", "stream_positions", "meter_baselines",
            "schema_migrations"} <= tables
    assert {"meter_id", "region", "window_start", "window_end", "avg_power", "max_power",
            "min_power", "total_energy", "sample_count", "created_at", "updated_at"} <= cols


def test_migrate_reports_mode(db_url: str) -> None:
    result = migrate(db_url)
    assert result.mode.startswith(("plain PostgreSQL", "timescaledb"))


def test_migrate_concurrently_applies_each_version_once(db_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(db_url), range(4)))
    applied = [v for r in results for v in r.applied]
    assert sorted(applied) == [v for v, _ in migration_files()]
    converted = sorted(t for r in results for t in r.converted)  # each table once, if at all
    assert converted in ([], ["aggregates_15m", "aggregates_1m", "aggregates_1m_regional"])


def test_migrate_makes_hypertables_where_timescaledb_is_preloaded(db_url: str) -> None:
    first = migrate(db_url)
    with psycopg.connect(db_url) as conn:
        ts = timescale(conn)
    if ts.available is None or not ts.preloaded:
        assert first.hypertables == [] and first.converted == []
        pytest.skip("the test server does not preload timescaledb")
    tables = ["aggregates_1m", "aggregates_15m", "aggregates_1m_regional"]
    assert first.converted == tables and first.hypertables == tables
    assert first.mode.startswith(f"timescaledb {ts.created} on PostgreSQL ")
    assert first.mode.endswith(
        ": hypertables aggregates_1m, aggregates_15m, aggregates_1m_regional")
    again = migrate(db_url)
    assert again.converted == [] and again.hypertables == tables and again.mode == first.mode


def test_aggregate_tables_keep_no_missing_values(db_url: str) -> None:
    """A value a table keeps for rows older than a column added with a default makes
    PostgreSQL convert every row it routes from a hypertable into a chunk: migrate clears
    them on tables holding no rows of their own (a later ADD COLUMN ... DEFAULT fails here
    until it is cleared too)."""
    migrate(db_url)
    with psycopg.connect(db_url) as conn:
        missing = conn.execute(
            "SELECT attrelid::regclass::text, attname FROM pg_attribute WHERE atthasmissing"
            " AND attrelid IN ('aggregates_1m'::regclass, 'aggregates_15m'::regclass)"
        ).fetchall()
    assert missing == []


def test_positions_stored_before_the_cursor_start_it_after_their_watermark(
        db_url: str) -> None:
    """schema/V011 on a database with positions: each partition's publishing cursors begin
    at the first window end after its watermark, before every row of that window, so the
    rows closed by then are never sent again and those still open are sent once closed."""
    migrate(db_url)
    [v011] = [sql for v, sql in migration_files() if v.startswith("V011")]
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO stream_positions (consumer_group, topic, kafka_partition, "
                     "next_offset, watermark_ms) VALUES ('g', 't', 0, 5, 1845000), "
                     "('g', 't', 1, 5, NULL)")
        conn.execute(v011.encode())  # as it runs on such a database, once
        rows = conn.execute(
            "SELECT kafka_partition, published_1m_ms, published_1m_meter, published_15m_ms, "
            "published_15m_meter FROM stream_positions ORDER BY 1").fetchall()
    assert rows == [(0, 1_860_000, "", 2_700_000, ""), (1, None, None, None, None)]
