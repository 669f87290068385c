-- Re-sent readings counted once (DEDUPLICATE, segs.checkpoint.dedup). A reading is identified by
-- (meter_id, timestamp): every aggregates_1m row keeps the millisecond offsets of the readings it
-- counted (16-bit little-endian, appended by each merge); NULL: not known (rows written before
-- this version or with DEDUPLICATE=off), and a reading merged into one is counted. The 15-minute
-- rows need none: every reading is deduplicated against its 1-minute window first.
-- stream_positions.newest_event_ms: the newest event time of the readings stored for a
-- partition, so a worker taking it over knows which windows cannot have a stored row.
-- meter_baselines.newest_reading_ms: the newest event time the detector folded for a meter.
-- Nullable and without defaults: no value kept for older rows (migrate.clear_missing_values),
-- and allowed on hypertables with compressed chunks. Every existing column stays as it was.
ALTER TABLE aggregates_1m ADD COLUMN IF NOT EXISTS identities BYTEA;
ALTER TABLE stream_positions ADD COLUMN IF NOT EXISTS newest_event_ms BIGINT;
ALTER TABLE meter_baselines ADD COLUMN IF NOT EXISTS newest_reading_ms BIGINT;
