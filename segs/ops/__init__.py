"""Operation: Prometheus metrics, the HTTP endpoint and readiness, structured logs, systemd
notification.
"""
