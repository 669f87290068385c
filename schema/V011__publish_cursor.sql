-- Closed windows are published in key order, per partition and table, up to a cursor kept with
-- the partition's position (segs.checkpoint.sink.Sink.claim_closed): published_<size>_ms and
-- published_<size>_meter are a key (window_end ms, meter_id) that every row published in that
-- order has reached; NULL: none yet. Having read to a watermark, the cursor moves to the next
-- window end after it and the empty meter id, a key before every row of that window. A row
-- written by its partition's owner after the cursor is published through it and never needs
-- a second write; published = false now marks only the rows that wait for the catch-up path
-- (written behind the cursor: late; or by a worker that does not own their partition).
--
-- Existing positions start at their watermark: every row closed by then was published or is
-- still unpublished (and taken by the catch-up path), and every open row is unpublished.
-- Window ends are multiples of the size since the epoch.
ALTER TABLE stream_positions
    ADD COLUMN IF NOT EXISTS published_1m_ms BIGINT,
    ADD COLUMN IF NOT EXISTS published_1m_meter TEXT,
    ADD COLUMN IF NOT EXISTS published_15m_ms BIGINT,
    ADD COLUMN IF NOT EXISTS published_15m_meter TEXT;
UPDATE stream_positions
    SET published_1m_ms = (watermark_ms / 60000 + 1) * 60000, published_1m_meter = '',
        published_15m_ms = (watermark_ms / 900000 + 1) * 900000, published_15m_meter = ''
    WHERE watermark_ms IS NOT NULL;
-- The cursor's order: each chunk starts where the last one ended. It replaces none of the
-- unpublished (catch-up) indexes of V005, whose rows are now few.
CREATE INDEX IF NOT EXISTS aggregates_1m_publish_key
    ON aggregates_1m (source_partition, window_end, meter_id);
CREATE INDEX IF NOT EXISTS aggregates_15m_publish_key
    ON aggregates_15m (source_partition, window_end, meter_id);
