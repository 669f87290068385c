-- Leave room on each page so merging a partial into a stored row is a HOT update (no index
-- entries written) whenever the row's indexed columns do not change, which is the rule.
ALTER TABLE aggregates_1m SET (fillfactor = 70);
ALTER TABLE aggregates_15m SET (fillfactor = 70);
