-- Hypertables used to be made here, once. They are now made after every migration by
-- segs.checkpoint.migrate.ensure_hypertables, which looks at the server each time: a database migrated
-- before TimescaleDB was installed or preloaded is converted by the next migration, and a
-- server that has the extension installed but not preloaded is never sent CREATE EXTENSION
-- (it ends the session with a FATAL). This version stays so recorded histories match.
SELECT 1;
