"""Versioned SQL migrations, applied in file-name order by `segs-stream migrate`."""
