-- Hypertables when the timescaledb extension can be loaded; plain tables otherwise.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is installed but cannot be loaded (%): plain tables', SQLERRM;
            RETURN;
        END;
        PERFORM create_hypertable('aggregates_1m', 'window_start',
                                  chunk_time_interval => INTERVAL '1 day',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('aggregates_15m', 'window_start',
                                  chunk_time_interval => INTERVAL '7 days',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    END IF;
END $$;
