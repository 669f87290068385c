"""Deployment files: the dashboard and alert rules use only exported metrics, the systemd
unit has what operations rely on, the compose file validates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from segs.config import SPECS
from segs.ops.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"

_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
# Series Prometheus makes itself for every target.
_BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, groupings removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text):
        word = m.group(1)
        if word.lower() not in _PROMQL_WORDS:
            names.add(word)
    return names


def is_exported(name: str) -> bool:
    if name in METRIC_NAMES:
        return True
    return any(name.endswith(s) and name[: -len(s)] in METRIC_NAMES for s in _SUFFIXES) or any(
        name.endswith(s) and f"{name[: -len(s)]}_total" in METRIC_NAMES for s in _SUFFIXES
    )


def test_promql_extractor() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, instance) (rate(db_write_latency_ms_bucket"
        '{job="x"}[$__rate_interval]))) > 10 and on (instance) up == 1'
    )
    assert promql_metrics(expr) == {"db_write_latency_ms_bucket", "up"}
    assert is_exported("db_write_latency_ms_bucket")
    assert is_exported("stream_messages_total")
    assert not is_exported("stream_messages")


def _dashboard_exprs(panels: list[dict[str, Any]]) -> list[str]:
    exprs = []
    for panel in panels:
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        exprs += _dashboard_exprs(panel.get("panels", []))
    return exprs


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "segs-stream.json").read_text())
    assert dash["uid"] == "segs-stream"
    exprs = _dashboard_exprs(dash["panels"])
    used: set[str] = set()
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, expr
        unknown = {n for n in names if not is_exported(n)}
        assert not unknown, f"{expr}: {unknown}"
        used |= names
    joined = "\n".join(exprs)
    for wanted in (
        "rate(stream_messages_total",
        "stream_lag_seconds",
        "stream_checkpoint_duration_seconds_bucket",
        "stream_invalid_messages_total",
        "stream_late_readings_total",
        "stream_anomalies_detected_total",
        "stream_worker_restarts_total",
        "db_write_latency_ms_bucket",
    ):
        assert wanted in joined, wanted
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    dash = json.loads((DEPLOY / "grafana" / "segs-stream.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {ds["uid"]}
    (provider,) = yaml.safe_load((prov / "dashboards" / "segs-stream.yml").read_text())["providers"]
    assert provider["type"] == "file"


def test_alert_rules_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = promql_metrics(rule["expr"])
            unknown = {n for n in names if not is_exported(n) and n not in _BUILTIN_SERIES}
            assert not unknown, f"{rule['alert']}: {unknown}"
            assert rule["labels"]["severity"] in {"warning", "critical"}
            alerts[rule["alert"]] = rule["expr"]
    assert "stream_lag_seconds" in alerts["SegsStreamLagGrowing"]
    assert "stream_messages_total[5m]" in alerts["SegsStreamNoMessages"]
    assert "timescaledb_connected" in alerts["SegsStreamDatabaseDisconnected"]
    assert "stream_worker_restarts_total" in alerts["SegsStreamWorkerRestarts"]


def test_prometheus_scrapes_the_processor() -> None:
    conf = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in conf["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "processor:3002" in targets
    assert conf["rule_files"]


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit() -> None:
    unit = _unit(DEPLOY / "segs-stream.service")
    svc = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "User": "segs",
        "Group": "segs",
        "EnvironmentFile": "/etc/segs-stream/env",
        "ExecStart": "/opt/segs-stream/.venv/bin/segs-stream run",
        "KillSignal": "SIGTERM",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RuntimeDirectory": "segs-stream",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert svc.get(key) == [value], key
    assert int(svc["TimeoutStopSec"][0]) > 30  # beyond the default SHUTDOWN_TIMEOUT
    multiproc = [v for v in svc["Environment"] if v.startswith("PROMETHEUS_MULTIPROC_DIR=")]
    assert multiproc == ["PROMETHEUS_MULTIPROC_DIR=/run/segs-stream/metrics"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = (DEPLOY / "segs-stream.service").read_text()
    copy = tmp_path / "segs-stream.service"
    copy.write_text(text.replace("/opt/segs-stream/.venv/bin/segs-stream", "/bin/true"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    if "Failed to" in done.stderr and "bus" in done.stderr.lower():
        pytest.skip(f"systemd-analyze unusable here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr, done.stderr


def test_env_example_names_only_known_settings() -> None:
    known = {s.env for s in SPECS}
    keys = set()
    for raw in (DEPLOY / "env.example").read_text().splitlines():
        line = raw.strip().lstrip("#").strip()
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=.*", line)
        if m:
            keys.add(m.group(1))
    assert keys <= known, keys - known
    assert {"KAFKA_BROKERS", "POSTGRES_URL", "KAFKA_SASL_PASSWORD", "PORT"} <= keys


def test_compose_file_structure() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    script = services["kafka-init"]["command"][0]
    for topic, partitions in (("raw_readings", 6), ("raw_readings.dlq", None)):
        assert f"create {topic} {partitions or ''}".strip() in script
    for topic in ("aggregates_1m", "aggregates_15m", "alerts"):
        assert f"create {topic} " in script
    assert services["timescaledb"]["image"] == "timescale/timescaledb:latest-pg16"
    assert "healthcheck" in services["timescaledb"]
    assert "wal_buffers=64MB" in services["timescaledb"]["command"]  # README, "Database settings"
    proc = services["processor"]
    assert proc["build"] == "."
    assert proc["environment"]["KAFKA_BROKERS"] == "kafka:9092"
    assert proc["environment"]["POSTGRES_URL"] == "postgresql://segs:segs@timescaledb:5432/segs"
    assert proc["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    assert proc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert services["simulator"]["command"] == [
        "simulate",
        "--rate",
        "2000",
        "--meters",
        "1000",
    ]
    assert {"prometheus", "grafana"} <= services.keys()


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
    if probe.returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # the v1 tool, where the v2 plugin is missing
    return [legacy] if legacy else None


def test_docker_compose_config() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker binary on PATH")
    cli = _compose_cli()
    if cli is None:
        pytest.skip("docker has no compose plugin and docker-compose is not installed")
    done = subprocess.run(
        [*cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS builder$", text, re.M)
    assert "python:3.11-slim" in text
    assert re.search(r"^USER segs", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/health" in text
    assert "EXPOSE 3002" in text
    assert 'ENTRYPOINT ["segs-stream"]' in text
    assert 'CMD ["run"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored
