-- Adopt aggregate tables made by the original stack's init script: its columns
-- (avg_power_kw … reading_count, DECIMAL and VARCHAR types, maybe no key) stay as they are and
-- keep their rows; this adds the columns segs-stream merges with and fills them from what
-- each row has. Runs first so V001 finds the columns its indexes need. A table that has
-- power_sum (made by segs-stream) or does not exist is left alone: on every other database
-- this version does nothing.
--
-- What cannot take part in exact merging, per table (counted in segs_adoption, and logged in
-- one line by segs-stream migrate):
-- * rows sharing a (meter_id, window_start): the one created last stays (what the original's
--   later upsert, last write wins, would have kept), the others move to
--   <table>_adopted_duplicates, untouched;
-- * every adopted row lacks a power sum: it is taken as avg_power_kw × reading_count (and the
--   voltage sum as voltage_avg × reading_count), exact to the decimals the original stored;
--   rows without avg_power_kw or reading_count count as empty history (0 readings), so a
--   later reading starts their average afresh.
-- Adopted rows are marked published (the original service published them) and their latest
-- reading is taken as the window's start, so any new reading decides the window's region.
-- Works on hypertables with compressed chunks and continuous aggregates over them:
-- TimescaleDB allows adding nullable columns and columns with a constant default there,
-- updating and deleting rows of compressed chunks, and adding the primary key; changing a
-- column's type is refused, so the original's types stay.
CREATE TABLE IF NOT EXISTS segs_adoption (
    table_name    TEXT PRIMARY KEY,
    adopted_rows  BIGINT NOT NULL,
    duplicates    BIGINT NOT NULL,
    without_sums  BIGINT NOT NULL,
    adopted_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

DO $$
DECLARE
    t TEXT;
    size INTERVAL;
    n_dup BIGINT;
    n_rows BIGINT;
    n_empty BIGINT;
    key_name TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['aggregates_1m', 'aggregates_15m'] LOOP
        size := CASE t WHEN 'aggregates_1m' THEN interval '1 minute' ELSE interval '15 minutes' END;
        IF to_regclass(t) IS NULL OR EXISTS (
                SELECT 1 FROM information_schema.columns
                WHERE table_schema = current_schema() AND table_name = t
                  AND column_name = 'power_sum') THEN
            CONTINUE;
        END IF;

        -- 1. duplicates out, the latest-created row of each key stays
        EXECUTE format('CREATE TEMP TABLE segs_dup ON COMMIT DROP AS SELECT * FROM %I '
                       'WHERE (meter_id, window_start) IN (SELECT meter_id, window_start '
                       'FROM %I GROUP BY 1, 2 HAVING count(*) > 1)', t, t);
        EXECUTE 'ALTER TABLE segs_dup ADD COLUMN segs_rank BIGINT';
        EXECUTE 'UPDATE segs_dup d SET segs_rank = r.n FROM (SELECT ctid AS c, row_number() '
                'OVER (PARTITION BY meter_id, window_start ORDER BY created_at DESC NULLS LAST, '
                'reading_count DESC NULLS LAST, segs_dup::text DESC) AS n FROM segs_dup) r '
                'WHERE d.ctid = r.c';
        EXECUTE format('DELETE FROM %I a USING (SELECT DISTINCT meter_id, window_start '
                       'FROM segs_dup) d WHERE a.meter_id = d.meter_id '
                       'AND a.window_start = d.window_start', t);
        EXECUTE 'CREATE TEMP TABLE segs_keep ON COMMIT DROP AS '
                'SELECT * FROM segs_dup WHERE segs_rank = 1';
        EXECUTE 'DELETE FROM segs_dup WHERE segs_rank = 1';
        EXECUTE 'ALTER TABLE segs_dup DROP COLUMN segs_rank';
        EXECUTE 'ALTER TABLE segs_keep DROP COLUMN segs_rank';
        EXECUTE format('INSERT INTO %I SELECT * FROM segs_keep', t);
        SELECT count(*) INTO n_dup FROM segs_dup;
        IF n_dup > 0 THEN
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I (LIKE %I)',
                           t || '_adopted_duplicates', t);
            EXECUTE format('INSERT INTO %I SELECT * FROM segs_dup', t || '_adopted_duplicates');
        END IF;
        DROP TABLE segs_dup;
        DROP TABLE segs_keep;

        -- 2. the merge's columns, filled from the original's
        EXECUTE format($f$ALTER TABLE %I
            ADD COLUMN IF NOT EXISTS window_end       TIMESTAMPTZ,
            ADD COLUMN IF NOT EXISTS avg_power        DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS max_power        DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS min_power        DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS total_energy     DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS sample_count     INTEGER,
            ADD COLUMN IF NOT EXISTS power_sum        DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS last_reading_at  TIMESTAMPTZ,
            ADD COLUMN IF NOT EXISTS source_partition INTEGER,
            ADD COLUMN IF NOT EXISTS published        BOOLEAN NOT NULL DEFAULT true,
            ADD COLUMN IF NOT EXISTS created_at       TIMESTAMPTZ,
            ADD COLUMN IF NOT EXISTS updated_at       TIMESTAMPTZ,
            ADD COLUMN IF NOT EXISTS "count"          INTEGER,
            ADD COLUMN IF NOT EXISTS voltage_sum      DOUBLE PRECISION NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS voltage_count    INTEGER NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS voltage_avg      DOUBLE PRECISION,
            ADD COLUMN IF NOT EXISTS current_avg      DOUBLE PRECISION$f$, t);
        -- defaults that are not constants only now: TimescaleDB refuses them on ADD COLUMN
        EXECUTE format('ALTER TABLE %I ALTER COLUMN published SET DEFAULT false, '
                       'ALTER COLUMN created_at SET DEFAULT now(), '
                       'ALTER COLUMN updated_at SET DEFAULT now()', t);
        EXECUTE format($f$UPDATE %I SET
            window_end = window_start + %L::interval,
            avg_power = avg_power_kw, max_power = max_power_kw, min_power = min_power_kw,
            total_energy = coalesce(energy_kwh_sum, 0),
            sample_count = CASE WHEN avg_power_kw IS NULL THEN 0
                                ELSE coalesce(reading_count, 0) END,
            power_sum = CASE WHEN reading_count IS NULL THEN 0
                             ELSE coalesce(avg_power_kw * reading_count, 0) END,
            "count" = reading_count,
            voltage_sum = CASE WHEN avg_power_kw IS NULL THEN 0
                               ELSE coalesce(voltage_avg * reading_count, 0) END,
            voltage_count = CASE WHEN avg_power_kw IS NULL OR voltage_avg IS NULL THEN 0
                                 ELSE coalesce(reading_count, 0) END,
            last_reading_at = window_start, source_partition = -1, published = true,
            updated_at = now()$f$,
            t, size);
        GET DIAGNOSTICS n_rows = ROW_COUNT;
        EXECUTE format('SELECT count(*) FROM %I WHERE avg_power_kw IS NULL '
                       'OR reading_count IS NULL', t) INTO n_empty;

        -- 3. the key the merge conflicts on, instead of a unique constraint on the same columns
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = t::regclass AND contype = 'p') THEN
            FOR key_name IN
                SELECT c.conname FROM pg_constraint c
                WHERE c.conrelid = t::regclass AND c.contype = 'u'
                  AND (SELECT array_agg(a.attname::text ORDER BY k.i)
                       FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n)
                      = ARRAY['meter_id', 'window_start']
            LOOP
                EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', t, key_name);
            END LOOP;
            EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (meter_id, window_start)', t);
        END IF;

        INSERT INTO segs_adoption (table_name, adopted_rows, duplicates, without_sums)
        VALUES (t, n_rows, n_dup, n_empty)
        ON CONFLICT (table_name) DO NOTHING;
    END LOOP;
END $$;
