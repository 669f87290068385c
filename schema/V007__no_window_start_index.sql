-- create_hypertable adds an index on window_start by default; the checkpoint does not need
-- it and every new row pays for it. Merges find rows by the primary key (meter_id,
-- window_start), publishing by aggregates_*_unpublished, and retention and compression work
-- on whole chunks, found by their time range. So segs.checkpoint.migrate makes hypertables without it
-- (create_default_indexes => false) and this drops it from aggregates_15m where an earlier
-- conversion, or the original stack's init script, made it. aggregates_1m keeps (or, by
-- V008, gets) one: the regional roll-up reads one window of it at a time.
DROP INDEX IF EXISTS aggregates_15m_window_start_idx;
