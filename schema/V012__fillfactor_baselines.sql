-- Half of each page free in meter_baselines (V004's rule): every checkpoint rewrites the
-- baseline of every meter that read something since the one before, while the version it
-- replaces is still live. With full pages almost none of those rewrites was a HOT update
-- (78 of 1,500,000), so each one added an entry to both indexes and the table doubled;
-- with half free nearly every one was (1,485,715). Upserting the baselines of 500,000 stored meters took
-- 3.6-3.8 s, now 1.7 s (benchmarks/README, "A new day's chunk, claims by key and baselines
-- with room"). Affects new pages only: VACUUM FULL meter_baselines rewrites the old ones.
ALTER TABLE meter_baselines SET (fillfactor = 50);
