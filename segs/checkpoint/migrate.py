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
``shared_preload_libraries``. Hypertables are made without TimescaleDB's default index on
``window_start`` (``schema/V007`` says why).
Then the values kept for rows older than an added column are cleared where no row needs
them (:func:`clear_missing_values`): with them, every row routed into a chunk is converted.

A database made by the original stack is adopted by ``schema/V000``; what it found is logged
in one line per table (:func:`adoption_lines`). Last, the TimescaleDB policies of
:class:`Policies` are made to match the settings on every hypertable; plain PostgreSQL
ignores them with one info line.
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

log = logging.getLogger("segs.migrate")

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
    adopted: list[str] = field(default_factory=list)  # one line per adopted table


@dataclass(frozen=True, slots=True)
class Policies:
    """TimescaleDB policies per aggregate table, in days; 0 = none (an existing one is
    removed). Defaults: the original stack's values."""

    retention_days: dict[str, int] = field(default_factory=lambda: {
        "aggregates_1m": 30, "aggregates_15m": 365})
    compress_after_days: dict[str, int] = field(default_factory=lambda: {
        "aggregates_1m": 7, "aggregates_15m": 30})


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
    files = [f for f in resources.files("segs.schema").iterdir() if f.name.endswith(".sql")]
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
                     " chunk_time_interval => %s::interval, if_not_exists => true,"
                     " migrate_data => true, create_default_indexes => false)"
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


def clear_missing_values(conn: Conn) -> list[str]:
    """Clear the stored values for "rows older than the column" on aggregate tables that hold
    no rows of their own; returns the tables cleared.

    A column added with a constant default (``schema/V000``, ``V006``) leaves such a value on
    its table (``pg_attribute.atthasmissing``), and PostgreSQL then converts every row it
    routes from a hypertable into a chunk, column by column, at each insert and twice at each
    merge. A hypertable's own table never holds rows (they are in its chunks, which keep
    theirs), nor does a table before its first checkpoint, so nothing reads the value there:
    it is cleared as PostgreSQL clears it when it rewrites a table. That is a catalog write,
    so it takes a superuser; another role gets one warning, and checkpoints stay slower.
    It runs after :func:`ensure_hypertables` on every migration: a table converted later is
    covered too. ``conn`` must be in autocommit mode.
    """
    cleared, left = [], []
    superuser = bool((conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                      .fetchone() or (False,))[0])
    for table in HYPERTABLES:
        with conn.transaction():
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
                continue
            missing = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = "
                                   "%s::regclass AND atthasmissing", (table,)).fetchone()
            if not missing or not missing[0]:
                continue
            # no row can go into the table itself (its chunks are not locked) while we look
            conn.execute(sql.SQL("LOCK TABLE ONLY {} IN SHARE ROW EXCLUSIVE MODE")
                         .format(sql.Identifier(table)))
            if conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM ONLY {})")
                            .format(sql.Identifier(table))).fetchone() != (False,):
                continue  # a plain table with rows: they read the values; nothing is routed
            if not superuser:
                left.append(table)
                continue
            conn.execute("UPDATE pg_attribute SET atthasmissing = false, attmissingval = NULL"
                         " WHERE attrelid = %s::regclass AND atthasmissing", (table,))
            cleared.append(table)
    if left:
        log.warning("%s keep values of added columns for older rows, so PostgreSQL converts "
                    "every row a checkpoint routes into a chunk (slower checkpoints): run "
                    "segs-stream migrate once as a superuser to clear them", " and ".join(left))
    return cleared


def adoption_lines(conn: Conn) -> list[str]:
    """What ``schema/V000`` did to each table of the original stack it adopted, a line each."""
    if conn.execute("SELECT to_regclass('segs_adoption')").fetchone() == (None,):
        return []
    rows = conn.execute("SELECT table_name, adopted_rows, duplicates, without_sums"
                        " FROM segs_adoption ORDER BY table_name").fetchall()
    return [f"adopted {table} of the original stack: {rows_} rows kept, their power sums "
            f"taken as avg_power_kw x reading_count (exact to the decimals stored); "
            f"{dups} duplicate (meter_id, window_start) rows moved to "
            f"{table}_adopted_duplicates; {empty} rows without avg_power_kw or "
            f"reading_count merge as empty history"
            for table, rows_, dups, empty in rows]


def ensure_policies(conn: Conn, policies: Policies) -> list[str]:
    """Make the retention and compression policies of every aggregate hypertable match
    ``policies``; returns a line per change. Compression segments by ``meter_id`` (a table
    that has compression set up already keeps its own segmenting). A late reading for a
    window in a compressed chunk is still merged: TimescaleDB decompresses the rows an
    upsert conflicts with. ``conn`` must be in autocommit mode."""
    ts = timescale(conn)
    hyper = hypertables(conn, ts)
    wanted = any(policies.retention_days.values()) or any(policies.compress_after_days.values())
    if not hyper:
        if wanted:
            log.info("TIMESCALEDB_RETENTION_* and TIMESCALEDB_COMPRESS_AFTER_* are ignored: "
                     "%s are not hypertables", " and ".join(HYPERTABLES))
        return []
    schema = sql.Identifier(ts.schema or "public")
    changes = []
    for table in hyper:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            jobs: dict[str, Any] = dict(conn.execute(
                "SELECT proc_name, config FROM timescaledb_information.jobs"
                " WHERE hypertable_name = %s AND proc_name IN"
                " ('policy_retention', 'policy_compression')", (table,)).fetchall())
            for proc, key, days, add, remove in (
                    ("policy_retention", "drop_after", policies.retention_days.get(table, 0),
                     "add_retention_policy", "remove_retention_policy"),
                    ("policy_compression", "compress_after",
                     policies.compress_after_days.get(table, 0),
                     "add_compression_policy", "remove_compression_policy")):
                have = jobs.get(proc)
                current = None if have is None else conn.execute(
                    "SELECT %s::interval", (have.get(key),)).fetchone()
                want = None if days == 0 else conn.execute(
                    "SELECT make_interval(days => %s)", (days,)).fetchone()
                if current == want:
                    continue
                if have is not None:
                    conn.execute(sql.SQL("SELECT {}.{}(%s::regclass)").format(
                        schema, sql.Identifier(remove)), (table,))
                if days:
                    if proc == "policy_compression":
                        _enable_compression(conn, table)
                    conn.execute(sql.SQL("SELECT {}.{}(%s::regclass, make_interval(days => %s))"
                                         ).format(schema, sql.Identifier(add)), (table, days))
                what = "retention" if proc == "policy_retention" else "compression"
                line = (f"{table}: {what} policy " + (f"{days} days" if days else "removed"))
                log.info("%s", line)
                changes.append(line)
    return changes


def _enable_compression(conn: Conn, table: str) -> None:
    on = conn.execute(
        "SELECT compression_enabled FROM timescaledb_information.hypertables"
        " WHERE to_regclass(quote_ident(hypertable_schema) || '.'"
        " || quote_ident(hypertable_name)) = to_regclass(%s)", (table,)).fetchone()
    if on and not on[0]:
        conn.execute(sql.SQL("ALTER TABLE {} SET (timescaledb.compress,"
                             " timescaledb.compress_segmentby = 'meter_id',"
                             " timescaledb.compress_orderby = 'window_start DESC')"
                             ).format(sql.Identifier(table)))


_DEADLOCK_TRIES = 5  # a migration's DDL can deadlock with TimescaleDB's background jobs


def migrate(url: str, policies: Policies | None = None) -> MigrationResult:
    """Bring the database at ``url`` to the newest schema version; then, when ``policies``
    is given, make the TimescaleDB policies match it (None leaves them as they are).

    A deadlock (e.g. an index built while a compression job works on the same chunks) is
    transient by definition: the whole migration runs again, versions already recorded are
    skipped. Raises :class:`~segs.errors.DatabaseError` when the server cannot be reached or
    the connection broke (worth retrying), :class:`~segs.errors.SchemaError` when it
    answered and refused (retrying gives the same answer).
    """
    applied: list[str] = []
    for attempt in range(1, _DEADLOCK_TRIES + 1):
        try:
            return _migrate_once(url, policies, applied)
        except (DatabaseError, SchemaError) as exc:
            if not isinstance(exc.__cause__, psycopg.errors.DeadlockDetected) \
                    or attempt == _DEADLOCK_TRIES:
                raise
            log.info("%s; running the migration again (%d of %d)", exc, attempt + 1,
                     _DEADLOCK_TRIES)
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _migrate_once(url: str, policies: Policies | None, applied: list[str]) -> MigrationResult:
    """One run of :func:`migrate`; ``applied`` collects the versions it records."""
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
            adopted = adoption_lines(conn) if any(v.startswith("V000") for v in applied) else []
            for line in adopted:
                log.info("%s", line)
            converted = ensure_hypertables(conn)
            clear_missing_values(conn)
            if policies is not None:
                ensure_policies(conn, policies)
            mode = storage_mode(conn)
            hyper = hypertables(conn, timescale(conn))
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"migration failed: {_one_line(exc)}") from exc
    except psycopg.Error as exc:
        raise SchemaError(f"migration failed: {_one_line(exc)}") from exc
    return MigrationResult(applied, already, mode, hyper, converted, adopted)


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
