"""segs-stream: real-time smart-meter telemetry processor."""

__version__ = "0.1.0"
