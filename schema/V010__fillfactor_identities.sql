-- Room for aggregates_1m rows to grow (V004's rule, for rows that get longer): with
-- DEDUPLICATE each merge appends 2 bytes an identity (V009), so a merged row is longer than
-- the version beside which it must fit to be a HOT update. At 50 % free, 6.5 % of the
-- updates of the checkpoint bench's merges (10 readings a partial, 216-277 byte rows) were
-- not HOT and inserted into every index; at 58 % free none was. Affects new pages only.
ALTER TABLE aggregates_1m SET (fillfactor = 42);
