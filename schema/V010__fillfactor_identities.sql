-- Room for aggregates_1m rows to grow (V004's rule, for rows that get longer): with
-- DEDUPLICATE each merge appends 2 bytes an identity (V009), so a merged row is longer than
-- the version beside which it must fit to be a HOT update (no index entries); at 50 % free
-- the longer versions of a full page no longer fit (benchmarks/README, "The checkpoint's
-- cost of identities, again"). Affects new pages only.
ALTER TABLE aggregates_1m SET (fillfactor = 42);
