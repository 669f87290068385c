-- Regional 1-minute roll-ups of aggregates_1m (segs.publish.regional): one row per (region, window),
-- computed once every partition of the input topic has passed the window's end, and again
-- when a late reading changes one of the window's rows. published: the row's current
-- content reached the regional topic; claimed_until: a publisher is delivering it (others
-- leave it alone until then). The meter list of the topic is read from aggregates_1m.
CREATE TABLE IF NOT EXISTS aggregates_1m_regional (
    region            TEXT             NOT NULL,
    window_start      TIMESTAMPTZ      NOT NULL,
    window_end        TIMESTAMPTZ      NOT NULL,
    meter_count       INTEGER          NOT NULL,
    total_consumption DOUBLE PRECISION NOT NULL,
    avg_consumption   DOUBLE PRECISION NOT NULL,
    max_consumption   DOUBLE PRECISION NOT NULL,
    min_consumption   DOUBLE PRECISION NOT NULL,
    load_percentage   DOUBLE PRECISION NOT NULL,
    published         BOOLEAN          NOT NULL DEFAULT false,
    claimed_until     TIMESTAMPTZ,
    created_at        TIMESTAMPTZ      DEFAULT now(),
    updated_at        TIMESTAMPTZ      DEFAULT now(),
    PRIMARY KEY (region, window_start)
);
CREATE INDEX IF NOT EXISTS aggregates_1m_regional_unpublished
    ON aggregates_1m_regional (window_start, region) WHERE NOT published;

-- Windows whose aggregates_1m rows a checkpoint wrote, waiting for their regional roll-up:
-- one row per window and checkpoint transaction, appended in that transaction (never
-- updated, so concurrent checkpoints never wait on each other); the roll-up deletes the
-- rows it read, so a row appended while it ran makes the window be computed once more.
CREATE TABLE IF NOT EXISTS regional_dirty (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group TEXT        NOT NULL,
    window_start   TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS regional_dirty_group ON regional_dirty (consumer_group, window_start);

-- The roll-up reads one window of aggregates_1m at a time, by an index led by window_start:
-- TimescaleDB made one (window_start DESC) where the table became a hypertable before this
-- version; a second would only slow every checkpoint down.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                   WHERE i.indrelid = 'aggregates_1m'::regclass AND a.attname = 'window_start'
                     AND i.indpred IS NULL) THEN
        CREATE INDEX aggregates_1m_window_start ON aggregates_1m (window_start);
    END IF;
END $$;
