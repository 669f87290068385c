-- create_hypertable adds an index on window_start by default; the checkpoint does not need
-- it and every new row pays for it. Merges find rows by the primary key (meter_id,
-- window_start), publishing by aggregates_*_unpublished, and retention and compression work
-- on whole chunks, found by their time range. So segs.migrate makes hypertables without it
-- (create_default_indexes => false) and this drops it where an earlier conversion, or the
-- original stack's init script, made it. Queries by time range alone still exclude chunks by
-- window_start; an operator who wants an index for such queries adds one knowing its cost.
DROP INDEX IF EXISTS aggregates_1m_window_start_idx;
DROP INDEX IF EXISTS aggregates_15m_window_start_idx;
