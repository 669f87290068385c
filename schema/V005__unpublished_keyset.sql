-- Closed windows are published chunk by chunk, each partition's unpublished rows read in key
-- order (segs.checkpoint.sink.Sink.claim_closed): this index gives that order, so each chunk starts
-- where the last one ended instead of re-reading and sorting a window's rows. It serves the
-- lookups of the index it replaces as well.
CREATE INDEX IF NOT EXISTS aggregates_1m_unpublished_key
    ON aggregates_1m (source_partition, window_end, meter_id) WHERE NOT published;
CREATE INDEX IF NOT EXISTS aggregates_15m_unpublished_key
    ON aggregates_15m (source_partition, window_end, meter_id) WHERE NOT published;
DROP INDEX IF EXISTS aggregates_1m_unpublished;
DROP INDEX IF EXISTS aggregates_15m_unpublished;
