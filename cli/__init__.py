"""Command-line interface of segs-stream."""
