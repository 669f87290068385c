"""Apply the versioned SQL files of ``schema/`` once each, in name order.

Every file runs in its own transaction together with the row that records it in
``schema_migrations``; a transaction-scoped advisory lock makes concurrent start-ups (several
workers, several hosts) apply each version exactly once. Running it again is a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

from segs.errors import DatabaseError

log = logging.getLogger(__name__)

_LOCK_KEY = 0x5E65_0001  # advisory lock id of segs-stream migrations


@dataclass(frozen=True, slots=True)
class MigrationResult:
    applied: list[str]
    already: list[str]
    mode: str  # "timescaledb <version>" or "plain PostgreSQL <version>"


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL text) of every migration, in order."""
    files = [f for f in resources.files("schema").iterdir() if f.name.endswith(".sql")]
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8"))
            for f in sorted(files, key=lambda f: f.name)]


def storage_mode(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
                       ).fetchone()
    if row:
        return f"timescaledb {row[0]} (hypertables)"
    version = conn.execute("SHOW server_version").fetchone()
    return f"plain PostgreSQL {version[0] if version else '?'}"


def migrate(url: str) -> MigrationResult:
    """Bring the database at ``url`` to the newest schema version."""
    applied: list[str] = []
    already: list[str] = []
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SET client_min_messages = warning")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            for version, sql in migration_files():
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s",
                                        (version,)).fetchone()
                    if done:
                        already.append(version)
                        continue
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                                 (version,))
                    applied.append(version)
                    log.info("applied schema version %s", version)
            mode = storage_mode(conn)
    except psycopg.Error as exc:
        raise DatabaseError(f"migration failed: {str(exc).strip().splitlines()[0]}") from exc
    return MigrationResult(applied, already, mode)
