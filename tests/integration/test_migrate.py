"""Migrations against the real PostgreSQL server."""

from __future__ import annotations

import psycopg
import pytest

from segs.migrate import migrate, migration_files

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
