"""Apply the versioned SQL files of ``schema/`` once each, in name order, then make the
aggregate tables hypertables when TimescaleDB can be used.

Every file runs in its own transaction together with the row that records it in
``schema_migrations``; a transaction-scoped advisory lock makes concurrent start-ups (several
workers, several hosts) apply each version exactly once. Running it again is a no-op.

Hypertables are not a versioned step: whether TimescaleDB can be used is a property of the
server, which changes when it is installed or preloaded later. So after the files, every
migration looks at the server and converts whichever aggregate table is not a hypertable
yet (:func:`ensure_hypertables`). It never tries ``CREATE EXTENSION timescaledb`` on a
server that does not preload the library: that ends the session with a FATAL no exception
handler can catch. Such a server keeps plain tables and gets one warning line naming
``shared_preload_libraries``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from segs.errors import DatabaseError, SchemaError

log = logging.getLogger(__name__)

_LOCK_KEY = 0x5E65_0001  # advisory lock id of segs-stream migrations

# aggregate table → chunk interval of its hypertable (partitioned on window_start, which each
# primary key ((meter_id | region), window_start) includes, as TimescaleDB requires); the
# regional roll-up has a row per region and minute, so its chunks span a week
HYPERTABLES = {"aggregates_1m": "1 day", "aggregates_15m": "7 days",
               "aggregates_1m_regional": "7 days"}

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class MigrationResult:
    applied: list[str]
    already: list[str]
    mode: str  # what :func:`storage_mode` found after the migration
    hypertables: list[str] = field(default_factory=list)  # aggregate tables that are ones
    converted: list[str] = field(default_factory=list)  # … made so by this migration


@dataclass(frozen=True, slots=True)
class Timescale:
    """What the server offers: the version installed, whether the library is preloaded,
    and the version created in this database (None when absent)."""

    available: str | None
    preloaded: bool
    created: str | None
    schema: str | None  # of the extension's functions, when created


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL text) of every migration, in order."""
    files = [f for f in resources.files("schema").iterdir() if f.name.endswith(".sql")]
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8"))
            for f in sorted(files, key=lambda f: f.name)]


def timescale(conn: Conn) -> Timescale:
    """Look at the server without loading anything.

    ``shared_preload_libraries`` is readable by superusers and ``pg_read_all_settings``
    only (``pg_settings`` hides it from others); without it, the setting that the
    preloaded loader library defines in every session tells the same.
    """
    row = conn.execute(
        "SELECT (SELECT default_version FROM pg_available_extensions"
        "        WHERE name = 'timescaledb'),"
        "       (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'),"
        "       EXISTS (SELECT 1 FROM pg_settings WHERE name = 'timescaledb.disable_load'"
        "               AND vartype = 'bool'),"
        "       e.extversion, n.nspname"
        " FROM (SELECT 1) one"
        " LEFT JOIN pg_extension e ON e.extname = 'timescaledb'"
        " LEFT JOIN pg_namespace n ON n.oid = e.extnamespace").fetchone()
    assert row is not None
    available, libraries, loader, created, schema = row
    preloaded = loader if libraries is None else _names_timescaledb(libraries)
    return Timescale(available, bool(preloaded), created, schema)


def _names_timescaledb(libraries: str) -> bool:
    for name in libraries.split(","):
        base = name.strip().strip('"').rsplit("/", 1)[-1].removesuffix(".so")
        if base == "timescaledb":
            return True
    return False


def hypertables(conn: Conn, ts: Timescale) -> list[str]:
    """The aggregate tables that are hypertables (TimescaleDB's own catalogue says)."""
    if ts.created is None:
        return []
    rows = conn.execute(
        "SELECT t.name FROM unnest(%s::text[]) AS t(name)"
        " JOIN timescaledb_information.hypertables h"
        " ON to_regclass(quote_ident(h.hypertable_schema) || '.'"
        "                || quote_ident(h.hypertable_name)) = to_regclass(t.name)"
        " ORDER BY array_position(%s::text[], t.name)",
        (list(HYPERTABLES), list(HYPERTABLES))).fetchall()
    return [str(r[0]) for r in rows]


def storage_mode(conn: Conn) -> str:
    """One line of what is true now: the extension's version and which aggregate tables
    are hypertables, or plain PostgreSQL and why."""
    ts = timescale(conn)
    version = conn.execute("SHOW server_version").fetchone()
    server = f"PostgreSQL {version[0] if version else '?'}"
    if ts.created is None:
        if ts.available is None:
            return f"plain {server}"
        why = "installed, not created" if ts.preloaded else "installed but not preloaded"
        return f"plain {server}; timescaledb {ts.available} {why}"
    hyper = hypertables(conn, ts)
    plain = [t for t in HYPERTABLES if t not in hyper]
    parts = [f"hypertables {', '.join(hyper)}"] if hyper else []
    parts += [f"plain tables {', '.join(plain)}"] if plain else []
    loaded = "" if ts.preloaded else ", not preloaded"
    return f"timescaledb {ts.created}{loaded} on {server}: {'; '.join(parts)}"


def ensure_hypertables(conn: Conn) -> list[str]:
    """Create the extension when it can be loaded and make every aggregate table that is
    not a hypertable yet one, moving its rows into chunks; returns the tables converted.

    Converting holds an ACCESS EXCLUSIVE lock on the table while its rows are copied
    (README, "TimescaleDB"): writers wait for it. Each table converts in a transaction of
    its own. ``conn`` must be in autocommit mode.
    """
    ts = timescale(conn)
    if ts.available is None and ts.created is None:
        return []  # plain PostgreSQL, as intended
    if not ts.preloaded:
        log.warning(
            "timescaledb %s is installed but not preloaded, so %s are not made "
            "hypertables: add timescaledb to shared_preload_libraries in postgresql.conf "
            "and restart PostgreSQL; the next segs-stream migrate (or run) converts them",
            ts.created or ts.available, " and ".join(HYPERTABLES))
        return []
    if ts.created is None:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except psycopg.errors.InsufficientPrivilege as exc:
            log.warning(
                "timescaledb %s is preloaded but this user may not create the extension "
                "(%s), so %s stay plain tables: run CREATE EXTENSION timescaledb as a "
                "superuser; the next segs-stream migrate (or run) converts them",
                ts.available, _one_line(exc), " and ".join(HYPERTABLES))
            return []
        ts = timescale(conn)
    converted = []
    create = sql.SQL("SELECT {}.create_hypertable(%s::regclass, 'window_start',"
                     " chunk_time_interval => %s::interval,"
                     " if_not_exists => true, migrate_data => true)"
                     ).format(sql.Identifier(ts.schema or "public"))
    for table, chunk in HYPERTABLES.items():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if table in hypertables(conn, ts):
                continue
            t0 = time.monotonic()
            count = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            conn.execute(create, (table, chunk))
            rows = int(count[0]) if count else 0
            log.info("converted %s to a hypertable (timescaledb %s): %d rows moved into "
                     "chunks in %.1f s", table, ts.created, rows, time.monotonic() - t0)
            converted.append(table)
    return converted


def migrate(url: str) -> MigrationResult:
    """Bring the database at ``url`` to the newest schema version.

    Raises :class:`~segs.errors.DatabaseError` when the server cannot be reached or the
    connection broke (worth retrying), :class:`~segs.errors.SchemaError` when it answered
    and refused (retrying gives the same answer).
    """
    applied: list[str] = []
    already: list[str] = []
    try:
        with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
            conn.execute("SET client_min_messages = warning")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            for version, text in migration_files():
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s",
                                        (version,)).fetchone()
                    if done:
                        already.append(version)
                        continue
                    conn.execute(text.encode())
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                                 (version,))
                    applied.append(version)
                    log.info("applied schema version %s", version)
            converted = ensure_hypertables(conn)
            mode = storage_mode(conn)
            hyper = hypertables(conn, timescale(conn))
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"migration failed: {_one_line(exc)}") from exc
    except psycopg.Error as exc:
        raise SchemaError(f"migration failed: {_one_line(exc)}") from exc
    return MigrationResult(applied, already, mode, hyper, converted)


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
