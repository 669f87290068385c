-- The column names the original stack's API gateway reads, beside the contract's, on both
-- aggregate tables: the sink writes both sets in the same statement (segs.checkpoint.sink), so a row
-- always reads the same under either name. Stored generated columns would cost the same
-- bytes per row and cannot be added to an adopted hypertable that has compressed chunks, so
-- one mechanism serves every database. voltage_avg is exact and mergeable: the sink keeps
-- the voltage sum and the count of readings that carried a voltage, and voltage_avg is their
-- quotient, NULL when no reading had a voltage. current_avg stays NULL: readings carry no
-- current. On an adopted table (V000) the original's own columns exist already and keep
-- their types; rows stored before this version get the new names filled in from theirs,
-- once (no voltage was kept for them).
DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['aggregates_1m', 'aggregates_15m'] LOOP
        IF EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = t
                     AND column_name = 'avg_power_kw') THEN
            CONTINUE;  -- adopted: V000 added what the original lacked
        END IF;
        EXECUTE format($f$ALTER TABLE %I
            ADD COLUMN avg_power_kw   DOUBLE PRECISION,
            ADD COLUMN max_power_kw   DOUBLE PRECISION,
            ADD COLUMN min_power_kw   DOUBLE PRECISION,
            ADD COLUMN energy_kwh_sum DOUBLE PRECISION,
            ADD COLUMN reading_count  INTEGER,
            ADD COLUMN "count"        INTEGER,
            ADD COLUMN voltage_sum    DOUBLE PRECISION NOT NULL DEFAULT 0,
            ADD COLUMN voltage_count  INTEGER NOT NULL DEFAULT 0,
            ADD COLUMN voltage_avg    DOUBLE PRECISION,
            ADD COLUMN current_avg    DOUBLE PRECISION$f$, t);
        EXECUTE format('UPDATE %I SET avg_power_kw = avg_power, max_power_kw = max_power, '
                       'min_power_kw = min_power, energy_kwh_sum = total_energy, '
                       'reading_count = sample_count, "count" = sample_count', t);
    END LOOP;
END $$;
