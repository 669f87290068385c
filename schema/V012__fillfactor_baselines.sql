-- Half of each page free in meter_baselines (V004's rule): every checkpoint rewrites the
-- baseline of every meter that read something since the one before, while the version it
-- replaces is still live. With full pages almost none of those rewrites is a HOT update, so
-- each one adds an entry to both indexes and the table bloats; with half free nearly every
-- one is (benchmarks/README, "A new day's chunk, claims by key and baselines with room").
-- Affects new pages only: VACUUM FULL meter_baselines rewrites the old ones.
ALTER TABLE meter_baselines SET (fillfactor = 50);
