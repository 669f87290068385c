"""The database side of a checkpoint: partial aggregates, baselines and positions, atomically.

One :meth:`Sink.commit` is one transaction:

1. binary ``COPY`` of the partial aggregates of each window size into a temporary table:
   the drained 1-minute partials and their roll-up into 15-minute partials (the worker keeps
   only 1-minute partials; they nest exactly in 15-minute windows, and
   :func:`segs.windows.partials.roll_up` merges them per 15-minute window before the commit);
2. per aggregate table, the partials merged into stored rows with the arithmetic of
   :mod:`segs.windows.partials` (:func:`merge_set` is that arithmetic in SQL, written once,
   for the statements below); with reading identities, those of the undecided readings'
   windows are read first and the partials made in the transaction (:class:`Deferred`,
   :mod:`segs.checkpoint.dedup`). Partials of windows the worker wrote, or may have
   written, before go in by an ``UPDATE`` of each chunk (or plain table) that holds them,
   joined on the key, in a savepoint, and those it found no row for are inserted next;
   should one of those be inserted by another transaction meanwhile, or a row sit in a
   compressed chunk, the savepoint rolls back and one ``INSERT … SELECT … ON CONFLICT
   (meter_id, window_start) DO UPDATE`` (the *upsert*) merges them all. Partials of windows
   the worker never wrote (*fresh*, :class:`segs.checkpoint.payload.WrittenWindows`) come in
   a temporary table of their own and are inserted plainly, in a savepoint: a plain insert
   skips the conflict probe and speculative insertion an upsert costs per row. Should one of
   them exist after all, the savepoint rolls back and the upsert merges them;
3. the detector's changed baselines, upserted;
   with regional aggregates on, one ``regional_dirty`` row per 1-minute window written
   (:mod:`segs.publish.regional`: that window's regional roll-up is due again);
4. the next position (and newest event time) of every covered partition, written with a
   compare-and-set on the
   position this worker last read or wrote — when any compare fails the partition moved to
   another owner, the transaction rolls back and :class:`~segs.errors.FencedError` is raised.

:meth:`Sink.commit_all` writes several such transactions side by side, one connection each:
the worker cuts a checkpoint along partitions (:mod:`segs.checkpoint.payload`) so that each
transaction is a complete checkpoint of its own partitions, and PostgreSQL runs them on
separate cores.

The transaction first locks the positions of its partitions and reads their publishing
cursors (schema/V011): a row written after its partition's cursor is flagged ``published``
at once, meaning the cursor will publish it; one written behind it (a late reading), or for
a partition the commit does not cover, is flagged ``published = false`` for the catch-up.

Publishing closed windows is a second, separate step (:meth:`Sink.claim_closed`), chunk by
chunk and never inside a transaction: a chunk of closed rows is read, the caller delivers it
to Kafka, and only then is it recorded — the cursor moved past it, or the caught-up rows
marked ``published``, each only if still the version that was read. A crash in between
publishes them again (at-least-once), never zero times. A row the cursor publishes is written
once; the catch-up writes its rows a second time.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from segs.checkpoint.migrate import hypertables, timescale
from segs.checkpoint.pgcopy import CopyData
from segs.errors import DatabaseError, FencedError, SegsError
from segs.intake.decode import METER_ID_MAX, REGION_MAX
from segs.times import NEVER
from segs.windows.sizes import ONE_MINUTE, SIZES, WindowSize

log = logging.getLogger("segs.sink")

TABLES = {size.seconds: size.table for size in SIZES}  # window size (s) → aggregate table
# the sizes whose rows keep their readings' identities: the finest, which every reading is
# deduplicated against before it reaches any partial (segs.checkpoint.dedup)
IDENTITY_SIZES = (ONE_MINUTE.seconds,)

# One partial aggregate row as Python values; window times as epoch milliseconds.
# Python rows may stop before the voltage columns: then no reading had a voltage.
PARTIAL_COLUMNS = (
    "meter_id", "region", "window_start_ms", "sample_count", "power_sum", "power_max",
    "power_min", "energy_sum", "last_ts_ms", "source_partition", "voltage_sum",
    "voltage_count", "identities",
)
_PARTIAL_TYPES = ("text", "text", "int8", "int8", "float8", "float8", "float8", "float8",
                  "int8", "int4", "float8", "int8", "bytea")
_PARTIAL_DEFAULTS = {"voltage_sum": "0", "voltage_count": "0"}


class BaselineRow(NamedTuple):
    """One meter's stored detector state (table ``meter_baselines``)."""

    meter_id: str
    source_partition: int
    baseline: float
    samples: int
    last_outage_ms: int
    last_spike_ms: int
    last_drop_ms: int
    newest_reading_ms: int | None = None  # newest event time folded; None: stored before V009


BASELINE_COLUMNS = BaselineRow._fields
_BASELINE_TYPES = ("text", "int4", "float8", "int8", "int8", "int8", "int8", "int8")
# Rows to COPY: binary COPY data naming its columns (segs.checkpoint.pgcopy), or Python rows.
Rows = CopyData | Iterable[Sequence[Any]]

_TS = "('epoch'::timestamptz + {} * interval '1 millisecond')"

# The merge of two partials, in SQL: `a` is the stored row, EXCLUDED the incoming partial.
# Region and source partition follow the greatest (last reading time, region, partition).
_NEWER = ("ROW(EXCLUDED.last_reading_at, EXCLUDED.region COLLATE \"C\", "
          "EXCLUDED.source_partition) > ROW(a.last_reading_at, a.region COLLATE \"C\", "
          "a.source_partition)")
# The original stack's names (schema/V006) are written in the same statement as the
# contract's, from the same expressions: on an insert (from a partial p) and on a merge.
_AVG = "(a.power_sum + EXCLUDED.power_sum) / (a.sample_count + EXCLUDED.sample_count)"
_COUNT = "a.sample_count + EXCLUDED.sample_count"
_VOLTAGE_AVG = ("(a.voltage_sum + EXCLUDED.voltage_sum)"
                " / NULLIF(a.voltage_count + EXCLUDED.voltage_count, 0)")
# original name → (its value on an insert, on a merge): the figures an adopted table keeps
# as DECIMAL (see fitted())
ORIGINAL_FIGURES = {
    "avg_power_kw": ("power_sum / sample_count", _AVG),
    "max_power_kw": ("power_max", "GREATEST(a.max_power, EXCLUDED.max_power)"),
    "min_power_kw": ("power_min", "LEAST(a.min_power, EXCLUDED.min_power)"),
    "energy_kwh_sum": ("energy_sum", "a.total_energy + EXCLUDED.total_energy"),
    "voltage_avg": ("voltage_sum / NULLIF(voltage_count, 0)", _VOLTAGE_AVG),
}
# column → (precision, scale) of a NUMERIC(p, s) the original stack's names have
Numeric = Mapping[str, tuple[int, int]]


def fitted(column: str, expr: str, numeric: Numeric) -> str:
    """``expr`` as written into ``column``: where the column is NUMERIC(p, s) (an adopted
    table, schema/V000, keeps the original's DECIMAL(12, 4) and (8, 2)), NULL when the value
    does not fit, instead of the error that would fail the checkpoint. The test is the
    cast's own: the value rounded to s decimals has fewer than p - s integer digits."""
    if column not in numeric:
        return expr
    precision, scale = numeric[column]
    return (f"CASE WHEN abs(round(({expr})::numeric, {scale})) < 1e{precision - scale} "
            f"THEN {expr} END")


def merge_set(numeric: Numeric, identities: bool = False) -> str:
    """The merge of two partials, in SQL, for a table whose original-name columns of
    :data:`ORIGINAL_FIGURES` are ``numeric``; ``identities``: it keeps reading identities
    (``aggregates_1m``, :mod:`segs.checkpoint.dedup`: NULL, not known, stays NULL)."""
    originals = "".join(f"    {c} = {fitted(c, merge, numeric)},\n"
                        for c, (_, merge) in ORIGINAL_FIGURES.items())
    kept = "    identities = a.identities || EXCLUDED.identities,\n" if identities else ""
    return f"""
    sample_count = {_COUNT},
    power_sum = a.power_sum + EXCLUDED.power_sum,
    avg_power = {_AVG},
    max_power = GREATEST(a.max_power, EXCLUDED.max_power),
    min_power = LEAST(a.min_power, EXCLUDED.min_power),
    total_energy = a.total_energy + EXCLUDED.total_energy,
{originals}    reading_count = {_COUNT},
    "count" = {_COUNT},
    voltage_sum = a.voltage_sum + EXCLUDED.voltage_sum,
    voltage_count = a.voltage_count + EXCLUDED.voltage_count,
    region = CASE WHEN {_NEWER} THEN EXCLUDED.region ELSE a.region END,
    source_partition = CASE WHEN {_NEWER} THEN EXCLUDED.source_partition
                            ELSE a.source_partition END,
    last_reading_at = GREATEST(a.last_reading_at, EXCLUDED.last_reading_at),
{kept}    published = EXCLUDED.published AND a.source_partition = EXCLUDED.source_partition,
    updated_at = now()
"""


MERGE_SET = merge_set({})  # on every table segs-stream made: all columns double precision

# A partial of the temporary table ``source`` as the aggregate row it becomes, each value named
# by its column: what an insert writes, and what a merge calls EXCLUDED.
# {published}: a placeholder each commit fills with published_flags(): the row comes after
# its partition's publishing cursor, so the cursor publishes it; otherwise the catch-up claim
# must (Sink.claim_closed).
_ROW = """SELECT meter_id, region, {start} AS window_start, {end} AS window_end,
    power_sum / sample_count AS avg_power, power_max AS max_power, power_min AS min_power,
    energy_sum AS total_energy, sample_count, power_sum, {last} AS last_reading_at,
    source_partition, {published} AS published, {originals}, sample_count AS reading_count,
    sample_count AS "count", voltage_sum, voltage_count{identities}
FROM {source} AS p"""
_INSERT = """
INSERT INTO {table} AS a (meter_id, region, window_start, window_end, avg_power, max_power,
    min_power, total_energy, sample_count, power_sum, last_reading_at, source_partition,
    published, avg_power_kw, max_power_kw, min_power_kw, energy_kwh_sum, voltage_avg,
    reading_count, "count", voltage_sum, voltage_count{identities})
{row}
"""
_MERGE = """
WITH merged AS ({insert}
ON CONFLICT (meter_id, window_start) DO UPDATE SET {merge_set}
RETURNING (xmax = 0) AS inserted)
SELECT count(*) FILTER (WHERE inserted), count(*) FROM merged
"""
# The merge into rows known to be stored, as an UPDATE of one table or chunk ({{target}})
# joined on the key: the upsert's SET list without its speculative insertion and row lock
# per row. {{within}} keeps the partials of other chunks out.
_UPDATE = """
UPDATE {{target}} AS a SET {merge_set}
FROM ({row}{{within}}) AS excluded
WHERE a.meter_id = excluded.meter_id AND a.window_start = excluded.window_start
"""
# After the UPDATEs: the insert of the partials of one table or chunk ({{target}}; {{within}}:
# the condition that keeps the partials of other chunks out) that the UPDATE found no row
# for. Probing the chunk, not the hypertable, which would probe every chunk, or with a bound
# on window_start, fall into the planner trap of _merge_stored.
_INSERT_MISSING = """{insert}
WHERE {{within}}NOT EXISTS (SELECT FROM {{target}} AS s
    WHERE s.meter_id = p.meter_id AND s.window_start = {start})
"""


class Statements(NamedTuple):
    """The checkpoint's statements for the tables at hand (:func:`_statements`)."""

    # each a template of the placeholders of published_flags() (and, for the last two, of
    # the table or chunk {target} and the condition {within} that keeps the others out)
    merge: dict[str, str]  # temporary table → the upsert of its partials
    insert_fresh: dict[int, str]  # window size → the plain insert of its fresh partials
    update: dict[int, str]  # window size → the update of stored rows (a _UPDATE template)
    insert_missing: dict[int, str]  # window size → the insert of stored partials with no row


def _row(size: int, source: str, numeric: Numeric) -> str:
    """The partials of one window size in the temporary table ``source`` as rows."""
    originals = ", ".join(f"{fitted(c, insert, numeric)} AS {c}"
                          for c, (insert, _) in ORIGINAL_FIGURES.items())
    return _ROW.format(
        source=source, start=_TS.format("window_start_ms"), published=f"{{published_{size}}}",
        end=_TS.format(f"(window_start_ms + {size * 1000})"), last=_TS.format("last_ts_ms"),
        originals=originals, identities=", identities" if size in IDENTITY_SIZES else "")


def _insert(size: WindowSize, source: str, numeric: Numeric) -> str:
    """The insert of one window size's partials from the temporary table ``source``."""
    return _INSERT.format(table=size.table, row=_row(size.seconds, source, numeric),
                          identities=", identities" if size.seconds in IDENTITY_SIZES else "")


def _statements(numeric: Mapping[str, Numeric]) -> Statements:
    """The statements for tables whose original-name columns of :data:`ORIGINAL_FIGURES` are
    ``numeric`` (table → its NUMERIC columns; none on a table segs-stream made)."""
    merges, inserts, updates, missing = {}, {}, {}, {}
    for size in SIZES:
        cols, keeps = numeric.get(size.table, {}), size.seconds in IDENTITY_SIZES
        for source in (size.partials_table, size.fresh_table):
            merges[source] = _MERGE.format(
                insert=_insert(size, source, cols), merge_set=merge_set(cols, keeps))
        inserts[size.seconds] = _insert(size, size.fresh_table, cols)
        updates[size.seconds] = _UPDATE.format(
            merge_set=merge_set(cols, keeps), row=_row(size.seconds, size.partials_table, cols))
        missing[size.seconds] = _INSERT_MISSING.format(
            insert=_insert(size, size.partials_table, cols).strip(),
            start=_TS.format("p.window_start_ms"))
    return Statements(merges, inserts, updates, missing)


# the longest names the contract allows: a column at least this long limits nothing
CONTRACT_NAME_MAX = {"meter_id": METER_ID_MAX, "region": REGION_MAX}
# the columns whose types limit what a table stores: read once per sink (Sink.stored_types)
_COLUMN_TYPES = """
SELECT table_name::text, column_name::text, data_type::text,
    character_maximum_length::int, numeric_precision::int, numeric_scale::int
FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY(%s) AND column_name = ANY(%s)
"""


@dataclass(frozen=True, slots=True)
class StoredTypes:
    """What the aggregate tables can store where their columns are narrower than the
    contract's (a database adopted from the original stack, schema/V000): the longest meter
    id and region (None: TEXT, no limit), and per table the original-name figures kept as
    NUMERIC(p, s). On a database segs-stream made: nothing."""

    meter_id_max: int | None = None
    region_max: int | None = None
    numeric: Mapping[str, Numeric] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]]) -> StoredTypes:
        """From rows of :data:`_COLUMN_TYPES`."""
        lengths: dict[str, list[int]] = {"meter_id": [], "region": []}
        numeric: dict[str, dict[str, tuple[int, int]]] = {}
        for table, column, data_type, length, precision, scale in rows:
            if column in lengths and length is not None:
                lengths[column].append(int(length))
            elif column in ORIGINAL_FIGURES and data_type == "numeric" and precision:
                numeric.setdefault(table, {})[column] = (int(precision), int(scale or 0))
        return cls(min(lengths["meter_id"], default=None), min(lengths["region"], default=None),
                   numeric)

    def __str__(self) -> str:
        parts = [f"{what} longer than {n} characters are dead-lettered ({column}_too_long_"
                 "for_table)" for what, column, n in (
                     ("meter ids", "meter_id", self.meter_id_max),
                     ("regions", "region", self.region_max))
                 if n is not None and n < CONTRACT_NAME_MAX[column]]
        columns = sorted({f"{c} NUMERIC({p},{s})" for cols in self.numeric.values()
                          for c, (p, s) in cols.items()})
        if columns:
            parts.append(f"a figure that does not fit {', '.join(columns)} is written NULL "
                         "there (the contract's columns keep it exactly)")
        return "; ".join(parts)


_STATEMENTS = _statements({})

# One chunk of closed, unpublished rows: per partition (w.p) at most %s rows of windows ending
# by its watermark (w.wm), after its keyset position (w.after_end, w.after_meter; NULL at the
# start), in the order of the index of V005 (source_partition, window_end, meter_id).
_CLAIM_READ = """
SELECT w.p, c.window_end, c.version, c.meter_id, c.region, c.start_ms, c.avg_power,
    c.max_power, c.min_power, c.total_energy, c.sample_count
FROM unnest(%s::int4[], %s::int8[], %s::timestamptz[], %s::text[])
    AS w(p, wm, after_end, after_meter)
CROSS JOIN LATERAL (
    SELECT a.xmin::text AS version, a.window_end, a.meter_id, a.region,
        (extract(epoch FROM a.window_start) * 1000)::int8 AS start_ms, a.avg_power,
        a.max_power, a.min_power, a.total_energy, a.sample_count
    FROM {table} AS a
    WHERE NOT a.published AND a.source_partition = w.p
      AND a.window_end <= ('epoch'::timestamptz + w.wm * interval '1 millisecond')
      AND (a.window_end, a.meter_id)
          > (COALESCE(w.after_end, '-infinity'), COALESCE(w.after_meter, ''))
    ORDER BY a.window_end, a.meter_id
    LIMIT %s) AS c
ORDER BY w.p, c.window_end, c.meter_id
"""
# After delivery: a row still at the version read (xmin) is published; a row written since
# (a merge, or another worker's claim) is left unpublished, written once more so that any
# other claim of it in flight fails its own check too (Sink.claim_closed says why).
_CLAIM_MARK = """
WITH marked AS (
    UPDATE {table} AS a SET published = (a.xmin::text = k.version)
    FROM unnest(%s::text[], %s::int8[], %s::text[]) AS k(meter_id, start_ms, version)
    WHERE a.meter_id = k.meter_id
      AND a.window_start = ('epoch'::timestamptz + k.start_ms * interval '1 millisecond')
    RETURNING a.published)
SELECT count(*) FILTER (WHERE published) FROM marked
"""
_CLAIM_SQL = {size: (sql.SQL(_CLAIM_READ).format(table=sql.Identifier(table)),
                     sql.SQL(_CLAIM_MARK).format(table=sql.Identifier(table)))
              for size, table in TABLES.items()}

# The publishing cursor of each window size: columns of stream_positions (schema/V011)
CURSOR_COLUMNS = {size.seconds: (f"published_{size.granularity}_ms",
                                 f"published_{size.granularity}_meter") for size in SIZES}


class Cursor(NamedTuple):
    """A partition's publishing cursor of one window size: every row it publishes in key
    order (window end, meter id) comes after this key; ``end_ms`` None: none yet."""

    end_ms: int | None
    meter: str


class Flags(NamedTuple):
    """The published flag of a row written now, per window size: SQL for the statements'
    ``{published_<size>}`` placeholders, and the parameters it takes."""

    sql: dict[str, str]
    params: dict[int, list[Any]]

    def statement(self, template: str, size: int, **parts: str) -> tuple[bytes, list[Any] | None]:
        """``template`` (of window size ``size``) filled in, and its parameters."""
        return template.format(**self.sql, **parts).encode(), self.params[size] or None


def published_flags(cursors: Mapping[int, Mapping[int, Cursor]]) -> Flags:
    """The published flags of rows written now from the cursors of the commit's partitions
    (size → partition → cursor): after the cursor of its partition, or for the catch-up.
    The cursors are parameters, so the statements' text stays the same from commit to
    commit (psycopg prepares them); the partitions are not, and change only on rebalance."""
    flags, params = {}, {}
    for size in SIZES:
        cases, values = [], []
        for partition, (end_ms, meter) in sorted(cursors.get(size.seconds, {}).items()):
            if end_ms is None:
                cases.append(f"WHEN {int(partition)} THEN true")
            else:
                cases.append(f"WHEN {int(partition)} THEN ROW(p.window_start_ms + {size.ms}, "
                             "p.meter_id) > ROW(%s::int8, %s::text)")
                values += [end_ms, meter]
        flags[f"published_{size.seconds}"] = (
            f"CASE p.source_partition {' '.join(cases)} ELSE false END" if cases else "false")
        params[size.seconds] = values
    return Flags(flags, params)
# A commit's partitions: their positions locked first, so that a claim moving one of their
# cursors waits for the commit and then finds the position changed (Sink.claim_closed), and
# their cursors read for the published flag of the rows written (_ROW).
_LOCK_POSITIONS = sql.SQL("""
SELECT kafka_partition, {columns} FROM stream_positions
WHERE consumer_group = %s AND topic = %s AND kafka_partition = ANY(%s)
ORDER BY kafka_partition FOR UPDATE
""").format(columns=sql.SQL(", ").join(
    sql.Identifier(c) for size in SIZES for c in CURSOR_COLUMNS[size.seconds]))
# One chunk of the rows after the cursor: per partition (w.p) its position's version and
# cursor, and at most %s rows of windows ending by its watermark (w.wm), in the order of the
# index of V011 (source_partition, window_end, meter_id); a partition with no row left has
# one row of NULLs, a partition with no position none.
_CURSOR_READ = """
SELECT w.p, s.version, s.end_ms, c.end_ms, c.version, c.meter_id, c.region,
    c.start_ms, c.avg_power, c.max_power, c.min_power, c.total_energy, c.sample_count
FROM unnest(%s::int4[], %s::int8[]) AS w(p, wm)
JOIN LATERAL (
    SELECT xmin::text AS version, {end} AS end_ms, {meter} AS meter FROM stream_positions
    WHERE consumer_group = %s AND topic = %s AND kafka_partition = w.p) AS s ON true
LEFT JOIN LATERAL (
    SELECT a.xmin::text AS version, (extract(epoch FROM a.window_end) * 1000)::int8 AS end_ms,
        a.window_end, a.meter_id, a.region,
        (extract(epoch FROM a.window_start) * 1000)::int8 AS start_ms, a.avg_power,
        a.max_power, a.min_power, a.total_energy, a.sample_count
    FROM {table} AS a
    WHERE a.published AND a.source_partition = w.p
      AND a.window_end <= ('epoch'::timestamptz + w.wm * interval '1 millisecond')
      AND (a.window_end, a.meter_id)
          > (COALESCE('epoch'::timestamptz + s.end_ms * interval '1 millisecond',
                      '-infinity'), COALESCE(s.meter, ''))
    ORDER BY a.window_end, a.meter_id
    LIMIT %s) AS c ON true
ORDER BY w.p, c.window_end, c.meter_id
"""
# After delivery, first: a partition's cursor moves on only if its position is the version
# read (no commit of the partition since, nor a claim by another worker).
_CURSOR_MOVE = """
UPDATE stream_positions SET {end} = %s, {meter} = %s
WHERE consumer_group = %s AND topic = %s AND kafka_partition = %s AND xmin::text = %s
"""
# Then: a row of the chunk at a version other than the one read was written since and goes
# to the catch-up claim; found by its key, wherever it is now (a write may have moved it to
# another partition, whose catch-up may even have published it meanwhile).
_CURSOR_CHECK = """
UPDATE {table} AS a SET published = false
FROM unnest(%s::text[], %s::int8[], %s::text[]) AS k(meter_id, start_ms, version)
WHERE a.meter_id = k.meter_id
  AND a.window_start = ('epoch'::timestamptz + k.start_ms * interval '1 millisecond')
  AND a.published AND a.xmin::text <> k.version
"""
# Set first in every claim read. A chunk is each partition's next rows in index order
# (LIMIT): on a chunk no ANALYZE has seen yet (each new day's), the planner expects a few
# rows and takes a bitmap scan of all the partition's rows after the keyset, sorted, for
# every chunk, so a claim read its rows over and over (20 times slower at 200,000 rows).
_IN_INDEX_ORDER = b"SET LOCAL enable_bitmapscan = off"
# Set first in every transaction that finds rows by a list of keys (the checkpoint's updates,
# a claim's marks and checks): one primary-key probe per key. On a chunk no ANALYZE has seen
# the planner takes a merge or hash join instead, which reads and sorts every row of the
# chunk for every list (docs/reliability.md, case 14).
_BY_KEY = (b"SET LOCAL enable_hashjoin = off", b"SET LOCAL enable_mergejoin = off")


def _probe_by_key(conn: psycopg.Connection[Any] | psycopg.Cursor[Any]) -> None:
    """Apply :data:`_BY_KEY` to the transaction ``conn`` is in."""
    for setting in _BY_KEY:
        conn.execute(setting)
_CURSOR_SQL = {
    size: tuple(sql.SQL(q).format(table=sql.Identifier(TABLES[size]),
                                  end=sql.Identifier(end), meter=sql.Identifier(meter))
                for q in (_CURSOR_READ, _CURSOR_MOVE, _CURSOR_CHECK))
    for size, (end, meter) in CURSOR_COLUMNS.items()}


@dataclass(frozen=True, slots=True)
class Position:
    """A partition's stored position: the next offset to read, and its watermark."""

    next_offset: int
    watermark_ms: int | None
    newest_ms: int | None = None  # newest event time stored for it; None: before V009

    def stored_newest(self, lateness_ms: int) -> int:
        """The newest event time stored for the partition: no window starting later has a
        row of it. Positions stored before V009 have only the watermark (newest − lateness,
        or later)."""
        if self.newest_ms is not None:
            return self.newest_ms
        return NEVER if self.watermark_ms is None else self.watermark_ms + lateness_ms


@dataclass(frozen=True, slots=True)
class CommitStats:
    rows: dict[str, int]  # table → rows written (inserted or merged into)
    new_rows: dict[str, int]  # table → rows inserted (windows seen for the first time)
    baselines: int
    seconds: float
    duplicates: int = 0  # undecided readings found re-sent in the transaction


class ClosedRow(NamedTuple):
    """A closed window's stored figures, as read for publishing."""

    meter_id: str
    region: str
    window_start_ms: int
    avg_power: float
    max_power: float
    min_power: float
    total_energy: float
    sample_count: int


class PoolStats(NamedTuple):
    size: int  # connections of the pool
    idle: int
    waiting: int  # requests waiting for a connection


# A claim's place in one partition's closed rows: the last (window_end, meter_id) read.
_Keyset = tuple[datetime, str]

# A worker that stalls (SIGSTOP, a paused VM) inside a transaction keeps its row locks (the
# positions it updates), and the worker that took its partitions over would wait on them
# until the stalled one resumed. PostgreSQL ends such a session after this long idle in a
# transaction. A healthy worker is never idle in one: no transaction spans a Kafka delivery.
IDLE_IN_TXN_MS = 20_000
# Rows per chunk of claim_closed: read, delivered (produce + flush) and marked as one.
_CLAIM_CHUNK = 10_000
# Checkpoint transactions of one worker that run side by side (Sink.commit_all), the default
# of CHECKPOINT_WRITERS (the evidence: benchmarks/README.md, "Checkpoint").
DEFAULT_WRITERS = 2

class PositionWrite(NamedTuple):
    """What a checkpoint stores for one partition, compare-and-set from ``previous``."""

    previous: int | None  # the stored next offset it replaces; None when none is stored
    next_offset: int
    watermark_ms: int | None


Positions = dict[int, PositionWrite]  # by partition
# Partials to write, by window size (a key of TABLES); a missing size has none.
PartialsBySize = Mapping[int, Rows]


class Encoded(NamedTuple):
    """Partials of a checkpoint ready to COPY (:meth:`Sink.commit`'s arguments of that name)."""

    partials: PartialsBySize
    fresh: PartialsBySize
    windows: Sequence[int]
    duplicates: int = 0


class Deferred(NamedTuple):
    """Partials made in the transaction, from the stored identities of some 1-minute windows
    (:mod:`segs.checkpoint.dedup`): ``finish`` gets them, by window, in the order given
    (None: no row, or its identities are not known)."""

    meter_ids: list[str]
    window_starts_ms: list[int]
    finish: Callable[[list[bytes | None]], Encoded]


class CommitJob(NamedTuple):
    """One transaction of :meth:`Sink.commit_all`: the arguments of :meth:`Sink.commit`."""

    partials: PartialsBySize  # rows that may be stored already: merged
    baselines: Rows
    positions: Positions
    fresh: PartialsBySize  # rows of windows this worker never wrote: inserted
    # the 1-minute windows of its partials (regional); with ``deferred``, those they may
    # cover (the hypertable chunks made ahead: Sink.commit_all)
    window_starts_ms: Sequence[int]
    deferred: Deferred | None = None  # partials, fresh and windows are made in the transaction
    newest_ms: Mapping[int, int] = {}  # partition → newest event time stored (of positions)


class Sink:
    """PostgreSQL access of one worker, through a small psycopg pool."""

    def __init__(self, url: str, *, consumer_group: str, topic: str,
                 statement_timeout_ms: int = 60_000, writers: int = DEFAULT_WRITERS,
                 regional: bool = False) -> None:
        """``writers``: connections that write checkpoint transactions side by side; the
        pool has one more, for publishing and reads. ``regional``: checkpoints record the
        windows they wrote for the regional roll-up."""
        self.group = consumer_group
        self.regional = regional
        self.topic = topic
        self.writers = writers
        self._threads: ThreadPoolExecutor | None = None  # started by the first commit_all
        self._types: StoredTypes | None = None  # learnt by the first stored_types()
        self._types_lock = threading.Lock()
        self._sql = _STATEMENTS
        self._hypertables: frozenset[str] = frozenset()  # learnt with _types
        self._chunks: dict[str, list[tuple[int, int]]] = {}  # table → chunks known to exist
        self._pool = ConnectionPool(
            url, min_size=1, max_size=writers + 1, open=False, timeout=5.0, reconnect_timeout=0,
            check=ConnectionPool.check_connection, configure=_create_temp_tables,
            name="segs-sink",
            kwargs={"connect_timeout": 5,
                    "options": f"-c statement_timeout={statement_timeout_ms} "
                               f"-c idle_in_transaction_session_timeout={IDLE_IN_TXN_MS}"},
        )

    def open(self) -> None:
        """Start the pool without waiting: a database that is still away is tried again on
        each use (``reconnect_timeout=0`` gives up a failed attempt at once, and the next
        request starts a new one), so recovery is as fast as the caller's retry."""
        self._pool.open(wait=False)

    def pool_stats(self) -> PoolStats:
        stats = self._pool.get_stats()
        return PoolStats(stats.get("pool_size", 0), stats.get("pool_available", 0),
                         stats.get("requests_waiting", 0))

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        self._pool.close()

    def ping(self) -> bool:
        try:
            with self._pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, psycopg_pool_error()):
            return False

    # ------------------------------------------------------------------ reads on assign

    def stored_types(self) -> StoredTypes:
        """What the aggregate tables can store, read from the catalogue by the first call
        (raises :class:`~segs.errors.DatabaseError` while the database is away); it also
        chooses the statements of every commit, so a table segs-stream made (all TEXT and
        double precision) pays nothing. It also learns which tables are hypertables, whose
        stored rows are updated chunk by chunk. A change of either takes a restart."""
        with self._types_lock:
            if self._types is None:
                types = StoredTypes.of(self._query(
                    _COLUMN_TYPES, (list(TABLES.values()),
                                    ["meter_id", "region", *ORIGINAL_FIGURES])))
                if types.numeric:
                    self._sql = _statements(types.numeric)
                self._hypertables = frozenset(self._hypertable_names())
                self._types = types
                if str(types):
                    log.info("the aggregate tables keep the original stack's column types: "
                             "%s", types)
            return self._types

    def _hypertable_names(self) -> list[str]:
        try:
            with self._pool.connection() as conn:
                return hypertables(conn, timescale(conn))
        except (psycopg.Error, psycopg_pool_error()) as exc:
            raise DatabaseError(_one_line(exc)) from exc

    def load_positions(self, partitions: Sequence[int]) -> dict[int, Position]:
        rows = self._query(
            "SELECT kafka_partition, next_offset, watermark_ms, newest_event_ms "
            "FROM stream_positions "
            "WHERE consumer_group = %s AND topic = %s AND kafka_partition = ANY(%s)",
            (self.group, self.topic, list(partitions)),
        )
        return {int(p): Position(int(o), None if w is None else int(w),
                                 None if e is None else int(e)) for p, o, w, e in rows}

    def stored_baselines(self, partitions: Sequence[int],
                         newer_than_ms: int | None = None) -> list[BaselineRow]:
        """The stored state of the meters last seen on these partitions; with
        ``newer_than_ms``, only of those that read something after it (or before V009)."""
        recent = "" if newer_than_ms is None else (
            " AND (newest_reading_ms IS NULL OR newest_reading_ms > %s)")
        params: tuple[Any, ...] = (self.group, list(partitions))
        return [BaselineRow._make(row) for row in self._query(
            f"SELECT {', '.join(BASELINE_COLUMNS)} FROM meter_baselines "
            "WHERE consumer_group = %s AND source_partition = ANY(%s)" + recent,
            params if newer_than_ms is None else (*params, newer_than_ms),
        )]

    def baselines_of(self, meter_ids: Sequence[str]) -> list[BaselineRow]:
        """The stored state of these meters, wherever they were last seen: one query."""
        return [BaselineRow._make(row) for row in self._query(
            f"SELECT {', '.join(BASELINE_COLUMNS)} FROM meter_baselines "
            "WHERE consumer_group = %s AND meter_id = ANY(%s)",
            (self.group, list(meter_ids)),
        )]

    def connection(self) -> AbstractContextManager[psycopg.Connection[TupleRow]]:
        """A pooled connection as a context manager (it commits on leaving, as psycopg's
        pool does), for the regional roll-up (:mod:`segs.publish.regional`)."""
        return self._pool.connection()

    def _query(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(query.encode(), params).fetchall()
        except (psycopg.Error, psycopg_pool_error()) as exc:
            raise DatabaseError(_one_line(exc)) from exc

    # ------------------------------------------------------------------ checkpoint

    def commit(self, partials: PartialsBySize, baselines: Rows, positions: Positions,
               fresh: PartialsBySize | None = None,
               windows: Sequence[int] = (), deferred: Deferred | None = None,
               newest_ms: Mapping[int, int] | None = None) -> CommitStats:
        """Write one checkpoint atomically (see the module docstring for the steps).

        ``partials`` maps a window size of :data:`TABLES` to its partials (distinct (meter,
        window) keys; the 15-minute ones the roll-up of the 1-minute ones) and
        ``baselines`` are detector states: binary COPY data
        (:class:`segs.checkpoint.pgcopy.CopyData`), or Python rows of :data:`PARTIAL_COLUMNS` /
        :data:`BASELINE_COLUMNS`.
        ``positions`` maps partition → (previous stored offset or None when there was none,
        next offset, watermark ms or None). ``fresh`` holds more partials as ``partials``
        does, of windows the worker never wrote, expected to be new rows (none may have the
        key of a row in ``partials``). ``windows`` are the 1-minute window starts (ms) the
        partials cover, recorded for the regional roll-up when it is on. With ``deferred``,
        the first statement reads the stored identities of its windows and ``partials``,
        ``fresh`` and ``windows`` are what its ``finish`` makes of them. ``newest_ms``: per
        partition of ``positions``, the newest event time of its readings stored so far.
        """
        t0 = time.perf_counter()
        self.stored_types()  # once: the statements that fit the tables
        statements, hyper = self._sql, self._hypertables
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                # Asynchronous commit is safe: a server crash loses this transaction whole,
                # positions included, so the worker re-reads exactly what was lost. work_mem
                # keeps the merges' RETURNING rows in memory. No JIT: a merge's time is index
                # probes and heap writes, and compiling would cost every large checkpoint.
                cur.execute(b"SET LOCAL synchronous_commit = off")
                cur.execute(b"SET LOCAL work_mem = '64MB'")
                cur.execute(b"SET LOCAL jit = off")
                # Updates of stored rows and reads of stored identities probe the primary
                # key once per partial or window (_BY_KEY). No other statement here joins.
                _probe_by_key(cur)
                flags = self._published_flags(cur, positions)
                duplicates = 0
                if deferred is not None:
                    partials, fresh, windows, duplicates = deferred.finish(
                        _stored_identities(cur, deferred, ONE_MINUTE.table in hyper))
                rows, new_rows = {}, {}
                for size in SIZES:
                    inserted = written = 0
                    if _copy(cur, size.fresh_table, (fresh or {}).get(size.seconds, ()),
                             PARTIAL_COLUMNS, _PARTIAL_TYPES):
                        inserted, written = _insert_fresh(
                            conn, cur,
                            flags.statement(statements.insert_fresh[size.seconds], size.seconds),
                            flags.statement(statements.merge[size.fresh_table], size.seconds))
                    n = _copy(cur, size.partials_table, partials.get(size.seconds, ()),
                              PARTIAL_COLUMNS, _PARTIAL_TYPES)
                    if n:
                        more_inserted, more_written = _merge_stored(
                            conn, cur, size, n, size.table in hyper, statements, flags)
                        inserted, written = inserted + more_inserted, written + more_written
                    rows[size.table], new_rows[size.table] = int(written), int(inserted)
                n_base = _copy(cur, "segs_baselines", baselines, BASELINE_COLUMNS,
                               _BASELINE_TYPES)
                if n_base:
                    cur.execute(_UPSERT_BASELINES, (self.group,))
                if self.regional and len(windows):
                    cur.execute(_DIRTY_WINDOWS, (self.group, list(windows)))
                self._write_positions(cur, positions, newest_ms or {})
        except FencedError:
            raise
        except (psycopg.Error, psycopg_pool_error()) as exc:
            raise DatabaseError(_one_line(exc)) from exc
        return CommitStats(rows, new_rows, n_base, time.perf_counter() - t0, duplicates)

    def commit_all(self, jobs: Sequence[CommitJob]) -> list[CommitStats | SegsError]:
        """Write each job with :meth:`commit` in a transaction of its own, side by side.

        The jobs must cover disjoint partitions (and so disjoint rows). Each one commits or
        fails on its own; the result list holds, per job, its stats or the
        :class:`~segs.errors.DatabaseError` / :class:`~segs.errors.FencedError` it raised.
        """
        self._make_chunks({start for job in jobs for start in job.window_starts_ms})
        if len(jobs) <= 1 or self.writers <= 1:
            return [self._try_commit(job) for job in jobs]
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.writers - 1,
                                               thread_name_prefix="segs-sink")
        others: list[Future[CommitStats | SegsError]] = [
            self._threads.submit(self._try_commit, job) for job in jobs[1:]]
        first = self._try_commit(jobs[0])  # this thread writes one of them itself
        return [first, *(f.result() for f in others)]

    def _make_chunks(self, window_starts_ms: set[int]) -> None:
        """Make the hypertable chunks that rows of these 1-minute windows go into and that do
        not exist yet, each table's in a short transaction of its own (:data:`_PLACEHOLDER`),
        before the checkpoint's transactions write into them side by side.

        Best effort: a chunk left out (database away, chunk dropped since) is made by the
        checkpoint that needs it, which then holds up the others until it commits."""
        if not window_starts_ms:
            return
        try:
            self.stored_types()  # learns which tables are hypertables
        except DatabaseError:
            return
        for size in SIZES:
            if size.table not in self._hypertables:
                continue
            known = self._chunks.setdefault(size.table, [])
            wanted = sorted(start for start in {s - s % size.ms for s in window_starts_ms}
                            if not _within(start, known))
            if not wanted:
                continue
            try:
                with self._pool.connection(timeout=_AHEAD_S) as conn, conn.transaction(), \
                        conn.cursor() as cur:
                    # not worth a wait: a chunk another transaction is making is made
                    cur.execute(f"SET LOCAL lock_timeout = '{_AHEAD_S}s'".encode())
                    existing = _chunk_ranges(cur, size.table, wanted)
                    missing = [s for s in wanted if not _within(s, existing)]
                    if missing:
                        _copy(cur, size.fresh_table, [_placeholder(s) for s in missing],
                              PARTIAL_COLUMNS, _PARTIAL_TYPES)
                        cur.execute(*published_flags({}).statement(
                            self._sql.insert_fresh[size.seconds], size.seconds))
                        cur.execute(_PLACEHOLDER.format(table=size.table).encode(),
                                    (missing,))
                        if cur.rowcount != len(missing):  # never commit a placeholder
                            raise psycopg.DataError(
                                f"{cur.rowcount} of {len(missing)} placeholders deleted")
                        log.debug("made %d chunk(s) of %s ahead of the checkpoint",
                                  len(missing), size.table)
                        existing = _chunk_ranges(cur, size.table, wanted)
            except (psycopg.Error, psycopg_pool_error()) as exc:
                log.debug("chunks of %s not made ahead: %s", size.table, _one_line(exc))
                return  # the checkpoint makes them (and finds the database away, if it is)
            known[:] = sorted({*known, *existing})[-_KNOWN_CHUNKS:]

    def _try_commit(self, job: CommitJob) -> CommitStats | SegsError:
        try:
            return self.commit(*job)
        except (DatabaseError, FencedError) as exc:
            return exc

    def _published_flags(self, cur: psycopg.Cursor[Any], positions: Positions) -> Flags:
        """Lock the positions of the commit's partitions and read their publishing cursors,
        as the statements' published flags (:func:`published_flags`). A partition with no
        position yet has published nothing; one whose position is gone is left out: its
        compare-and-set fences the commit off."""
        cursors: dict[int, dict[int, Cursor]] = {size.seconds: {} for size in SIZES}
        if positions:
            stored = {row[0]: row[1:] for row in cur.execute(
                _LOCK_POSITIONS, (self.group, self.topic, sorted(positions))).fetchall()}
            for partition, (previous, *_) in sorted(positions.items()):
                columns = stored.get(partition)
                if columns is None and previous is not None:
                    continue
                for i, size in enumerate(SIZES):
                    end, meter = (None, None) if columns is None else columns[2 * i:2 * i + 2]
                    cursors[size.seconds][partition] = Cursor(end, meter or "")
        return published_flags(cursors)

    def _write_positions(self, cur: psycopg.Cursor[Any], positions: Positions,
                         newest_ms: Mapping[int, int]) -> None:
        for partition, (prev, nxt, wm) in sorted(positions.items()):
            newest = newest_ms.get(partition)
            if prev is None:
                cur.execute(
                    "INSERT INTO stream_positions (consumer_group, topic, kafka_partition, "
                    "next_offset, watermark_ms, newest_event_ms) VALUES (%s, %s, %s, %s, %s, "
                    "%s) ON CONFLICT DO NOTHING",
                    (self.group, self.topic, partition, nxt, wm, newest),
                )
            else:
                cur.execute(
                    "UPDATE stream_positions SET next_offset = %s, watermark_ms = %s, "
                    "newest_event_ms = COALESCE(%s, newest_event_ms), "
                    "updated_at = now() WHERE consumer_group = %s AND topic = %s "
                    "AND kafka_partition = %s AND next_offset = %s",
                    (nxt, wm, newest, self.group, self.topic, partition, prev),
                )
            if cur.rowcount != 1:
                raise FencedError(
                    f"position of {self.topic}/{partition} moved away from {prev}: "
                    "another worker owns it now"
                )

    # ------------------------------------------------------------------ publishing

    def claim_closed(self, watermarks: dict[int, int],
                     deliver: Callable[[int, list[ClosedRow]], None], *,
                     stop: Callable[[], bool] = lambda: False) -> dict[int, int]:
        """Deliver the closed rows not yet published, in chunks, and record each chunk as
        published after it.

        ``watermarks`` maps partition → watermark ms: rows of that source partition whose
        window ended by it are closed. ``deliver(size_s, rows)`` is called with chunks of at
        most :data:`_CLAIM_CHUNK` rows and must have handed them to Kafka durably (produce
        + flush) before it returns. Each chunk is read in a short transaction of its own,
        delivered with no transaction open (none can outlast the server's idle timeout or
        hold locks that merges wait on), then recorded in a second short one; a chunk
        recorded stays so whatever happens to the next. If ``deliver`` raises, its chunk
        stays pending and the error propagates. ``stop()`` is asked before every chunk:
        when it says so the claim ends there, and the next one takes up what is left.
        Window sizes take turns chunk by chunk, partitions share each chunk. Returns size →
        rows delivered.

        Two paths, each reading a partition's rows in key order (window end, meter id):

        * **The cursor.** The rows a partition's owner writes after its publishing cursor
          (schema/V011) are published through it and need no second write: a chunk read
          after the cursor is delivered, then the cursor moves to its last row (to the
          next window end after the watermark once read to the end) — only if the
          position is still the version read. Every commit of the partition locks and
          changes its position first, so a row it wrote meanwhile keeps the cursor where
          it was, and is delivered again by the next claim. A row of the chunk at a
          version the read did not see (written meanwhile by a worker that does not own
          the partition, or by one that does while this one is fenced off) is flagged
          ``published = false`` for the catch-up path: a message just flushed carries
          older values than the row and may have landed after a newer one.
        * **The catch-up.** A row flagged ``published = false`` (written behind the cursor:
          a late reading; or by a worker that does not own its partition) is read, then
          marked ``published`` only if it is still the version that was read, compared by
          ``xmin`` (the transaction that wrote that version): every write of a row, a
          merge by any worker or another claim's mark, makes a new version with a new
          ``xmin``, while VACUUM, freezing and row locks keep it. ``updated_at`` would not
          do (two writers can share a transaction start time), nor would the values: a row
          changed since the read is also written once more, keeping ``published = false``,
          which only a new version can signal to other claims, so every claim of the row
          still in flight fails its check too, and the row is published again by a claim
          that reads it after all those messages are on the topic: the newest value is
          the last one there.
        """
        if not watermarks:
            return {}
        done = dict.fromkeys(TABLES, 0)
        # per window size: partition → watermark ms, for the cursor path; and partition →
        # (watermark ms, keyset position or None), for the catch-up path
        cursor: dict[int, dict[int, int]] = {
            size: {p: watermarks[p] for p in sorted(watermarks)} for size in TABLES}
        todo: dict[int, dict[int, tuple[int, _Keyset | None]]] = {
            size: {p: (watermarks[p], None) for p in sorted(watermarks)} for size in TABLES}
        try:
            while any(cursor.values()) or any(todo.values()):
                for size in TABLES:
                    if cursor[size] and not stop():
                        done[size] += self._cursor_chunk(size, cursor[size], deliver)
                    elif todo[size] and not stop():  # after the cursor: behind it, mostly
                        done[size] += self._claim_chunk(size, todo[size], deliver)
                if stop():
                    break
        except (psycopg.Error, psycopg_pool_error()) as exc:
            raise DatabaseError(_one_line(exc)) from exc
        return done

    def _cursor_chunk(self, size: int, parts: dict[int, int],
                      deliver: Callable[[int, list[ClosedRow]], None]) -> int:
        """Read, deliver and record one chunk of ``size``'s rows after the cursors of
        ``parts``; drops each partition read to its end, or whose cursor could not move.
        Returns the rows delivered."""
        read, move, check = _CURSOR_SQL[size]
        order = sorted(parts)
        per_part = max(1, _CLAIM_CHUNK // len(order))
        with self._pool.connection() as conn:  # commits (ends the read) on leaving
            conn.execute(_IN_INDEX_ORDER)
            got = conn.execute(read, (order, [parts[p] for p in order], self.group,
                                      self.topic, per_part)).fetchall()
        stored: dict[int, tuple[str, int | None]] = {}  # p → position's version, cursor end
        last: dict[int, tuple[int, str]] = {}  # p → key of its last row read
        counts: dict[int, int] = {}
        closed: list[ClosedRow] = []
        versions: list[str] = []  # of each row as read
        for p, position, after_ms, end_ms, version, *figures in got:
            stored[p] = (position, after_ms)
            if end_ms is None:  # no row left
                continue
            row = ClosedRow._make(figures)
            counts[p] = counts.get(p, 0) + 1
            last[p] = (end_ms, row.meter_id)
            closed.append(row)
            versions.append(version)
        if closed:
            deliver(size, closed)
        moves: list[tuple[int, int, str]] = []  # p → the cursor's new key
        for p in order:
            if p not in stored:  # no position: nothing it owns was written
                del parts[p]
                continue
            if counts.get(p, 0) == per_part:
                moves.append((p, *last[p]))
                continue
            # read to its end: the cursor goes to the first window end after the
            # watermark, before every row of that window (window ends are multiples of
            # the size), unless it is there or further already
            past = (parts.pop(p) // (size * 1000) + 1) * size * 1000
            after = stored[p][1]
            if after is None or past > after:
                moves.append((p, past, ""))
        if not moves and not closed:
            return 0
        with self._pool.connection() as conn, conn.transaction():
            _probe_by_key(conn)
            for p, end_ms, meter in moves:
                moved = conn.execute(move, (end_ms, meter, self.group, self.topic, p,
                                            stored[p][0]))
                if moved.rowcount != 1:  # changed since the read: read again next time
                    parts.pop(p, None)
            if closed:
                changed = conn.execute(check, ([r.meter_id for r in closed],
                                               [r.window_start_ms for r in closed],
                                               versions)).rowcount
                if changed > 0:
                    log.debug("%d closed %d s windows changed while delivered: they are "
                              "published again", changed, size)
        return len(closed)

    def _claim_chunk(self, size: int, parts: dict[int, tuple[int, _Keyset | None]],
                     deliver: Callable[[int, list[ClosedRow]], None]) -> int:
        """Read, deliver and mark one chunk of ``size``'s closed rows of ``parts``; moves
        each partition's keyset position on, or drops the partition when it has no more.
        Returns the rows delivered."""
        read, mark = _CLAIM_SQL[size]
        order = sorted(parts)
        per_part = max(1, _CLAIM_CHUNK // len(order))
        after = [parts[p][1] for p in order]
        with self._pool.connection() as conn:  # commits (ends the read) on leaving
            conn.execute(_IN_INDEX_ORDER)
            got = conn.execute(read, (
                order, [parts[p][0] for p in order], [a and a[0] for a in after],
                [a and a[1] for a in after], per_part)).fetchall()
        counts: dict[int, int] = {}
        closed: list[ClosedRow] = []
        versions: list[str] = []  # xmin of each row as read
        for p, end, version, *figures in got:  # ordered by partition, then key
            row = ClosedRow._make(figures)
            counts[p] = counts.get(p, 0) + 1
            parts[p] = (parts[p][0], (end, row.meter_id))
            closed.append(row)
            versions.append(version)
        for p in order:
            if counts.get(p, 0) < per_part:
                del parts[p]  # read to its end
        if got:
            deliver(size, closed)
            with self._pool.connection() as conn:  # one transaction, committed on leaving
                _probe_by_key(conn)
                marked = conn.execute(mark, ([r.meter_id for r in closed],
                                             [r.window_start_ms for r in closed],
                                             versions)).fetchone()
            if marked and marked[0] < len(got):
                log.debug("%d closed %d s windows changed while delivered: they are "
                          "published again", len(got) - marked[0], size)
        return len(got)


_UPSERT_BASELINES = b"""
INSERT INTO meter_baselines AS b (consumer_group, meter_id, source_partition, baseline,
    samples, last_outage_ms, last_spike_ms, last_drop_ms, newest_reading_ms)
SELECT %s, meter_id, source_partition, baseline, samples, last_outage_ms, last_spike_ms,
    last_drop_ms, newest_reading_ms FROM segs_baselines
ON CONFLICT (consumer_group, meter_id) DO UPDATE SET
    source_partition = EXCLUDED.source_partition, baseline = EXCLUDED.baseline,
    samples = EXCLUDED.samples, last_outage_ms = EXCLUDED.last_outage_ms,
    last_spike_ms = EXCLUDED.last_spike_ms, last_drop_ms = EXCLUDED.last_drop_ms,
    newest_reading_ms = EXCLUDED.newest_reading_ms,
    updated_at = now()
"""


# appended, never updated: concurrent checkpoints of one window never wait on each other
_DIRTY_WINDOWS = b"""
INSERT INTO regional_dirty (consumer_group, window_start)
SELECT %s, 'epoch'::timestamptz + w * interval '1 millisecond' FROM unnest(%s::int8[]) AS w
"""


# The stored identities of the windows a checkpoint's undecided readings fall in, from one
# table or chunk ({target}), by primary key, in the checkpoint's transaction (a window's owner
# is its partition's, and the positions' compare-and-set keeps every other writer of that
# partition out). The windows come as parallel arrays (meter id, window start ms), numbered
# from 1.
_STORED_IDENTITIES = f"""
SELECT k.i, a.identities
FROM unnest(%s::text[], %s::int8[]) WITH ORDINALITY AS k(meter_id, start_ms, i)
JOIN {{target}} AS a ON a.meter_id = k.meter_id
    AND a.window_start = {_TS.format("k.start_ms")}{{bound}}
"""


def _stored_identities(cur: psycopg.Cursor[Any], deferred: Deferred,
                       hypertable: bool) -> list[bytes | None]:
    """The stored identities of ``deferred``'s windows, in its order (None: no row, or not
    known). On a hypertable, chunk by chunk as :func:`_merge_stored` updates: a chunk by its
    own name (primary-key probes), a compressed one through the hypertable bounded to its
    range (TimescaleDB reads the compressed rows)."""
    found: list[bytes | None] = [None] * len(deferred.meter_ids)
    if not found:
        return found
    targets = [(ONE_MINUTE.table, "")]
    if hypertable:
        first, last = min(deferred.window_starts_ms), max(deferred.window_starts_ms)
        chunks = cur.execute(_CHUNKS, (ONE_MINUTE.table, first, last)).fetchall()
        targets = [(ONE_MINUTE.table, f" AND a.window_start >= {_literal_ts(lo)} AND "
                                      f"a.window_start < {_literal_ts(hi)}")
                   if compressed else (name, "") for name, compressed, lo, hi in chunks]
    for target, bound in targets:
        cur.execute(_STORED_IDENTITIES.format(target=target, bound=bound).encode(),
                    (deferred.meter_ids, deferred.window_starts_ms))
        for i, stored in cur.fetchall():
            found[int(i) - 1] = None if stored is None else bytes(stored)
    return found


def _literal_ts(ms: int) -> str:
    """Epoch milliseconds as a timestamptz literal: a constant, so TimescaleDB leaves the
    chunks outside a bound out of the plan."""
    return f"'{datetime.fromtimestamp(ms / 1000, UTC).isoformat()}'::timestamptz"


Statement = tuple[bytes, list[Any] | None]  # SQL and its parameters


def _insert_fresh(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], insert: Statement,
                  merge: Statement) -> tuple[int, int]:
    """Insert the fresh partials of a window size plainly (``insert``), or merge them
    (``merge``) if one of them is stored already; returns (rows inserted, rows written)."""
    try:
        with conn.transaction():  # a savepoint
            cur.execute(*insert)
            inserted = max(cur.rowcount, 0)
            return inserted, inserted
    except psycopg.errors.UniqueViolation:
        # written by another worker, or by this one before a restart: merge them all
        log.debug("fresh partials were stored already: merged instead")
        cur.execute(*merge)
        inserted, written = cur.fetchone() or (0, 0)
        return int(inserted), int(written)


# The chunks that hold the window starts from %s to %s (ms): where the rows of a checkpoint's
# stored partials are, unless a chunk is compressed (its rows are not in the chunk's own heap)
_CHUNKS = b"""
SELECT quote_ident(chunk_schema) || '.' || quote_ident(chunk_name), is_compressed,
    (extract(epoch FROM range_start) * 1000)::int8, (extract(epoch FROM range_end) * 1000)::int8
FROM timescaledb_information.chunks
WHERE to_regclass(quote_ident(hypertable_schema) || '.' || quote_ident(hypertable_name))
        = %s::regclass
    AND range_end > 'epoch'::timestamptz + %s * interval '1 ms'
    AND range_start <= 'epoch'::timestamptz + %s * interval '1 ms'
ORDER BY range_start
"""


# The placeholder rows that made TimescaleDB create chunks (Sink._make_chunks), deleted in the
# transaction that inserted them, so no one else ever sees them. A transaction that creates a
# chunk holds a lock on the hypertable until it ends, and every other one writing into that
# chunk waits for it: made inside checkpoints, a new day's chunk would run the first
# checkpoint of the day of every worker and writer one after the other. Meter ids are never
# empty (1–64 characters), so the placeholders' key is no meter's.
_PLACEHOLDER = """
DELETE FROM {table}
WHERE meter_id = '' AND window_start = ANY(SELECT 'epoch'::timestamptz + ms * interval '1 ms'
                                           FROM unnest(%s::int8[]) AS ms)
"""
_KNOWN_CHUNKS = 64  # chunk ranges a sink remembers per table: days (1-minute) or weeks
_AHEAD_S = 1.0  # the longest a checkpoint waits to make its chunks ahead (connection, lock)


def _placeholder(window_start_ms: int) -> tuple[Any, ...]:
    """A placeholder partial (:data:`_PLACEHOLDER`) of the window starting then."""
    return ("", "", window_start_ms, 1, 0.0, 0.0, 0.0, 0.0, window_start_ms, 0, 0.0, 0, None)


def _chunk_ranges(cur: psycopg.Cursor[Any], table: str,
                  starts_ms: Sequence[int]) -> list[tuple[int, int]]:
    """The (start, end) ms of the chunks of ``table`` from the first to the last of
    ``starts_ms``."""
    return [(int(lo), int(hi)) for _, _, lo, hi in
            cur.execute(_CHUNKS, (table, starts_ms[0], starts_ms[-1])).fetchall()]


def _within(ms: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(lo <= ms < hi for lo, hi in ranges)


class _NotAllStored(Exception):
    """Raised inside a savepoint to undo updates that did not find every row."""


def _merge_stored(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], size: WindowSize,
                  n: int, hypertable: bool, statements: Statements,
                  flags: Flags) -> tuple[int, int]:
    """Merge the ``n`` partials of ``size.partials_table`` into rows the worker wrote before
    (``flags``: :func:`published_flags`); returns (rows inserted, rows written).

    By an UPDATE of each table or chunk that holds them, in a savepoint: a partial matches at
    most one row and a row at most one partial, so the updates' row counts add up to ``n``
    exactly when every row was found. The partials whose row is not there (a late reading
    for a window never written, the first checkpoint after a restart) are then inserted.
    Should another transaction insert one of those meanwhile, or a row sit in a compressed
    chunk, the savepoint rolls back and the upsert merges them all."""
    targets: list[tuple[str, str]] = [(size.table, "")]  # (table or chunk, its partials)
    if hypertable:
        first, last = cur.execute(f"SELECT min(window_start_ms), max(window_start_ms) "
                                  f"FROM {size.partials_table}".encode()).fetchone() or (0, 0)
        chunks = cur.execute(_CHUNKS, (size.table, first, last)).fetchall()
        if any(compressed for _, compressed, _, _ in chunks) or not chunks:
            targets = []
        else:
            targets = [(name, "" if len(chunks) == 1 else
                        f"window_start_ms >= {int(lo)} AND window_start_ms < {int(hi)}")
                       for name, _, lo, hi in chunks]
    if targets:
        found = inserted = 0
        try:
            with conn.transaction():  # a savepoint
                for target, within in targets:
                    cur.execute(*flags.statement(
                        statements.update[size.seconds], size.seconds, target=target,
                        within=within and f" WHERE {within}"))
                    found += max(cur.rowcount, 0)
                if found == n:
                    return 0, n
                for target, within in targets:  # a partial in no chunk's range is left out
                    cur.execute(*flags.statement(
                        statements.insert_missing[size.seconds], size.seconds, target=target,
                        within=within and f"{within} AND "))
                    inserted += max(cur.rowcount, 0)
                if found + inserted == n:
                    return inserted, n
                raise _NotAllStored
        except (_NotAllStored, psycopg.errors.UndefinedTable,  # or a chunk dropped meanwhile
                psycopg.errors.UniqueViolation):  # a missing row inserted meanwhile
            log.debug("%d of %d %s partials found no row to update, and not all of them "
                      "could be inserted: upserted instead", n - found, n, size.table)
    cur.execute(*flags.statement(statements.merge[size.partials_table], size.seconds))
    inserted, written = cur.fetchone() or (0, 0)
    return int(inserted), int(written)


def _copy(cur: psycopg.Cursor[Any], table: str, data: Rows, columns: Sequence[str],
          types: Sequence[str]) -> int:
    """COPY binary data or Python rows (of ``columns``, ``types``) into a temporary table;
    returns the rows copied."""
    rows: Iterator[Sequence[Any]] = iter(())
    if isinstance(data, CopyData):
        names: Sequence[str] = data.columns
    else:  # Python rows name the leading columns they have
        rows = iter(data)
        first = next(rows, None)
        if first is None:
            return 0
        rows = itertools.chain([first], rows)
        names, types = columns[:len(first)], types[:len(first)]
    statement = f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
    with cur.copy(statement.encode()) as copy:
        if isinstance(data, CopyData):
            for chunk in data.chunks:
                copy.write(chunk)
        else:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    return max(cur.rowcount, 0)


def _create_temp_tables(conn: psycopg.Connection[Any]) -> None:
    """Create the checkpoint's temporary tables; the pool runs this on every new connection.

    In a transaction of their own, committed before any checkpoint: created inside a
    checkpoint's transaction, a rollback (fenced, failed) would drop them from a connection
    the pool holds as ready. A replacement connection (database restarted, backend
    terminated) gets them here too.
    """
    tables: list[tuple[str, Sequence[str], Sequence[str]]] = [
        (name, PARTIAL_COLUMNS, _PARTIAL_TYPES)
        for size in SIZES for name in (size.partials_table, size.fresh_table)]
    tables.append(("segs_baselines", BASELINE_COLUMNS, _BASELINE_TYPES))
    with conn.transaction():
        for name, columns, types in tables:
            spec = ", ".join(f"{c} {t}" + (f" DEFAULT {_PARTIAL_DEFAULTS[c]}"
                                           if c in _PARTIAL_DEFAULTS else "")
                             for c, t in zip(columns, types, strict=True))
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({spec}) "
                         "ON COMMIT DELETE ROWS".encode())


def psycopg_pool_error() -> type[Exception]:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
