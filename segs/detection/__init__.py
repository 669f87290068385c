"""Detection: per-meter spike, drop and outage detection over columnar batches."""
