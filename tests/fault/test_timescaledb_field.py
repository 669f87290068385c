"""TimescaleDB in the field: installed but not preloaded, and preloaded only later.

A server that has the timescaledb library installed but not in ``shared_preload_libraries``
ends the session with a FATAL on ``CREATE EXTENSION timescaledb``; `migrate` must not try it,
keep plain tables and say once what to change. When the library is preloaded later, the next
`migrate` turns the plain tables into hypertables with their rows, and the storage mode it
reports is what TimescaleDB's own catalogue says. Each test starts its own PostgreSQL cluster
(a few seconds), since it restarts it with other settings.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from segs.checkpoint.migrate import migration_files, storage_mode
from segs.checkpoint.sink import Sink
from segs.errors import InfraError
from segs.tools.local_servers import LocalPostgres, timescaledb_installed
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import (
    NO_POLICIES,
    SEGS,
    Service,
    assert_exact,
    end_offsets,
    expected,
    service_env,
    simulate,
    wait_consumed,
)


def _installed() -> bool:
    try:
        return timescaledb_installed()
    except InfraError:
        return False


pytestmark = pytest.mark.fault
needs_timescaledb = pytest.mark.skipif(
    not _installed(), reason="timescaledb is not installed for the local PostgreSQL")

PRELOAD = "shared_preload_libraries"
MINUTE_MS = 60_000
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00Z, a 15-minute boundary


@pytest.fixture
def cluster() -> Iterator[LocalPostgres]:
    """A cluster of its own, started without timescaledb preloaded."""
    pg = LocalPostgres(preload=False).start()
    try:
        yield pg
    finally:
        pg.close()


def _migrate(url: str) -> subprocess.CompletedProcess[str]:
    """`segs-stream migrate`, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "POSTGRES_"))}
    env.update(POSTGRES_URL=url, LOG_FORMAT="text", LOG_LEVEL="info", **NO_POLICIES)
    return subprocess.run([SEGS, "--env-file", "/dev/null", "migrate"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _mode(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("storage mode: ")]
    assert len(lines) == 1, res.stdout + res.stderr
    return lines[0].removeprefix("storage mode: ")


def _hypertables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
                            ).fetchone():
            return set()
        return {r[0] for r in conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables")}


def _rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(
            f"SELECT meter_id, window_start, window_end, sample_count, power_sum, max_power, "
            f"min_power, total_energy, avg_power, region, published FROM {t} "
            f"ORDER BY meter_id, window_start").fetchall()
            for t in ("aggregates_1m", "aggregates_15m")}


def _partials(meters: int, windows: int, size_s: int) -> list[tuple[object, ...]]:
    """Rows of segs.checkpoint.sink.PARTIAL_COLUMNS: two readings of 1 kW / 0.5 kWh per window."""
    return [(f"m{m}", "north", T0_MS + w * size_s * 1000, 2, 2.0, 1.5, 0.5, 1.0,
             T0_MS + w * size_s * 1000 + 1000, 0)
            for m in range(meters) for w in range(windows)]


@needs_timescaledb
def test_installed_but_not_preloaded_keeps_plain_tables_and_warns_once(
        cluster: LocalPostgres, kafka_server: KafkaServer, topics: Topics,
        tmp_path: Path) -> None:
    url = cluster.url
    t0 = time.monotonic()
    res = _migrate(url)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    warned = [ln for ln in (res.stdout + res.stderr).splitlines() if PRELOAD in ln]
    assert len(warned) == 1, res.stdout + res.stderr
    assert "warning" in warned[0].lower() and "timescaledb" in warned[0]
    assert "Traceback" not in res.stderr
    mode = _mode(res)
    assert mode.startswith("plain PostgreSQL") and "not preloaded" in mode, mode
    assert _hypertables(url) == set()
    assert took < 30, f"migrate took {took:.0f} s: it must not retry"

    # the service starts on it at once (no migration retries) and stores exactly
    messages = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=40, count=800, seed=61, invalid_fraction=0.02)
    svc = Service(service_env(kafka_server.bootstrap, url, topics.env()),
                  tmp_path / "service.log", workers=1).start()
    try:
        wait_consumed(url, topics.group, topics.input,
                      end_offsets(kafka_server.bootstrap, topics.input), timeout_s=60,
                      service=svc)
        assert svc.stop() == 0, svc.log_text()[-3000:]
    finally:
        svc.kill()
    want, _ = expected(messages, int(time.time() * 1000))
    assert assert_exact(url, want) > 0
    text = svc.log_text()
    assert "database not ready" not in text, text[-3000:]
    assert sum(PRELOAD in ln for ln in text.splitlines()) == 1, text[-3000:]


def _migrated_before_timescaledb_was_installed(url: str) -> None:
    """The state `migrate` left on a server without timescaledb: every version recorded,
    V002 included, and plain tables (V002 did nothing there)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY,"
                     " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for version, text in migration_files():
            with conn.transaction():
                if not version.startswith("V002"):
                    conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))


@needs_timescaledb
@pytest.mark.parametrize("history", ["migrated without preload", "migrated before install"])
def test_plain_tables_become_hypertables_once_timescaledb_is_preloaded(
        cluster: LocalPostgres, history: str) -> None:
    url = cluster.url
    if history == "migrated without preload":
        first = _migrate(url)
        assert first.returncode == 0, first.stdout + first.stderr
        assert _mode(first).startswith("plain PostgreSQL")
    else:
        _migrated_before_timescaledb_was_installed(url)

    sink = Sink(url, consumer_group="g", topic="t")
    sink.open()
    try:  # rows written on plain PostgreSQL: 3 meters × 5 minutes, rolled up into 15 min
        sink.commit({60: _partials(3, 5, 60), 900: _partials(3, 1, 900)}, [],
                    {0: (None, 10, None)})
    finally:
        sink.close()
    before = _rows(url)
    assert len(before["aggregates_1m"]) == 15 and len(before["aggregates_15m"]) == 3

    # the operator preloads timescaledb, restarts PostgreSQL and, as TimescaleDB's own
    # instructions say, creates the extension in the database
    cluster.preload = True
    cluster.stop()
    cluster.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION timescaledb")
        truth = storage_mode(conn)
    assert "plain tables aggregates_1m, aggregates_15m" in truth, truth
    assert "hypertables" not in truth, truth

    second = _migrate(url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert PRELOAD not in second.stdout + second.stderr
    converted = [ln for ln in second.stderr.splitlines() if "converted" in ln]
    assert len(converted) == 3, second.stderr
    assert "aggregates_1m" in converted[0] and "15 rows" in converted[0], converted
    assert "aggregates_15m" in converted[1] and "3 rows" in converted[1], converted
    mode = _mode(second)
    assert mode.startswith("timescaledb ") and \
        mode.endswith(": hypertables aggregates_1m, aggregates_15m, aggregates_1m_regional"), mode
    assert _hypertables(url) == {"aggregates_1m", "aggregates_15m", "aggregates_1m_regional"}
    assert _rows(url) == before  # every row survived, unchanged
    with psycopg.connect(url) as conn:  # … and lives in chunks now, not in the parent
        assert conn.execute("SELECT count(*) FROM ONLY aggregates_1m").fetchone() == (0,)
        fill = conn.execute(
            "SELECT DISTINCT k.hypertable_name::text, c.reloptions"
            " FROM timescaledb_information.chunks k"
            " JOIN pg_class c ON c.oid = to_regclass(quote_ident(k.chunk_schema) || '.'"
            " || quote_ident(k.chunk_name)) ORDER BY 1").fetchall()
    assert fill == [("aggregates_15m", ["fillfactor=50"]),  # V004
                    ("aggregates_1m", ["fillfactor=42"])], fill  # V010

    third = _migrate(url)  # nothing left to do
    assert third.returncode == 0 and "converted" not in third.stderr, third.stderr
    assert "schema versions applied: none" in third.stdout
    assert _mode(third) == mode

    # a checkpoint's merges into converted rows and its plain inserts of fresh windows work
    sink = Sink(url, consumer_group="g", topic="t")
    sink.open()
    try:
        stats = sink.commit({60: _partials(3, 5, 60), 900: _partials(3, 1, 900)}, [],
                            {0: (10, 20, None)})
        assert stats.rows == {"aggregates_1m": 15, "aggregates_15m": 3}
        later = [(m, r, s + 5 * MINUTE_MS, *rest) for m, r, s, *rest in _partials(3, 1, 60)]
        sink.commit({}, [], {0: (20, 30, None)}, fresh={60: later})
    finally:
        sink.close()
    after = _rows(url)
    assert len(after["aggregates_1m"]) == 18
    assert {r[3] for r in after["aggregates_1m"][:5]} == {4}  # merged: 2 + 2 readings
    assert {r[3] for r in after["aggregates_15m"]} == {4}


def test_run_does_not_retry_a_migration_the_server_refused(
        postgres_server: PostgresServer, db_url: str, tmp_path: Path) -> None:
    """Retrying helps while the database is away, not when it answered no: a role that
    may not create tables gets one error line and exit 1 at once."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        try:
            conn.execute("DROP ROLE IF EXISTS segs_no_create")
            conn.execute("CREATE ROLE segs_no_create LOGIN")
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the test server's user may not create roles")
    scheme, _, rest = db_url.partition("://")
    url = f"{scheme}://segs_no_create@{rest.partition('@')[2]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "POSTGRES_"))}
    env.update(POSTGRES_URL=url, LOG_FORMAT="text", PORT="0")
    t0 = time.monotonic()
    res = subprocess.run([SEGS, "--env-file", "/dev/null", "run", "--workers", "1"], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert "permission denied" in res.stderr and "database not ready" not in res.stderr
    assert took < 15, f"run took {took:.0f} s to give up"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP OWNED BY segs_no_create")
        conn.execute("DROP ROLE segs_no_create")
