-- Aggregate tables: the columns of the original service, plus what the merge needs.
-- power_sum lets partial aggregates merge exactly (avg = power_sum / sample_count);
-- last_reading_at + source_partition decide `region` order-independently;
-- published marks rows whose current content reached the aggregates topic.
CREATE TABLE IF NOT EXISTS aggregates_1m (
    meter_id         TEXT             NOT NULL,
    region           TEXT             NOT NULL,
    window_start     TIMESTAMPTZ      NOT NULL,
    window_end       TIMESTAMPTZ      NOT NULL,
    avg_power        DOUBLE PRECISION NOT NULL,
    max_power        DOUBLE PRECISION NOT NULL,
    min_power        DOUBLE PRECISION NOT NULL,
    total_energy     DOUBLE PRECISION NOT NULL,
    sample_count     INTEGER          NOT NULL,
    power_sum        DOUBLE PRECISION NOT NULL,
    last_reading_at  TIMESTAMPTZ      NOT NULL,
    source_partition INTEGER          NOT NULL,
    published        BOOLEAN          NOT NULL DEFAULT false,
    created_at       TIMESTAMPTZ      DEFAULT now(),
    updated_at       TIMESTAMPTZ      DEFAULT now(),
    PRIMARY KEY (meter_id, window_start)
);
CREATE INDEX IF NOT EXISTS aggregates_1m_unpublished
    ON aggregates_1m (source_partition, window_end) WHERE NOT published;

CREATE TABLE IF NOT EXISTS aggregates_15m (LIKE aggregates_1m INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'aggregates_15m'::regclass
                   AND contype = 'p') THEN
        ALTER TABLE aggregates_15m ADD PRIMARY KEY (meter_id, window_start);
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS aggregates_15m_unpublished
    ON aggregates_15m (source_partition, window_end) WHERE NOT published;

-- Consumer positions, written in the same transaction as the aggregates they cover.
-- Updates are compare-and-set on next_offset: a worker that lost a partition cannot commit.
CREATE TABLE IF NOT EXISTS stream_positions (
    consumer_group  TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    next_offset     BIGINT      NOT NULL,
    watermark_ms    BIGINT,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- Anomaly detector state per meter, saved with the positions so replays re-detect exactly.
CREATE TABLE IF NOT EXISTS meter_baselines (
    consumer_group   TEXT             NOT NULL,
    meter_id         TEXT             NOT NULL,
    source_partition INTEGER          NOT NULL,
    baseline         DOUBLE PRECISION NOT NULL,
    samples          BIGINT           NOT NULL,
    last_outage_ms   BIGINT           NOT NULL,
    last_spike_ms    BIGINT           NOT NULL,
    last_drop_ms     BIGINT           NOT NULL,
    updated_at       TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, meter_id)
);
CREATE INDEX IF NOT EXISTS meter_baselines_partition
    ON meter_baselines (consumer_group, source_partition);
