"""Operations on the real servers: /metrics consistent with what happened, /ready honest."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from segs.ops.metrics import METRIC_NAMES
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import Service, end_offsets, read_topic, service_env, simulate, wait_consumed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTRACT = ("stream_messages_total", "stream_aggregates_written_total",
            "stream_aggregates_published_total", "stream_anomalies_detected_total",
            "stream_alerts_published_total", "stream_aggregation_flush_duration",
            "db_write_latency_ms", "stream_lag_seconds", "stream_windowed_readings_gauge",
            "stream_window_buckets_gauge", "kafka_consumer_connected",
            "kafka_producer_connected", "timescaledb_connected")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(port: int) -> dict[str, float]:
    """Sample name{labels} → value, summed over label values per name too."""
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if labels:
                key = f"{s.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def _wait_ready(port: int, want: int, timeout_s: float = 60) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = _get(f"http://127.0.0.1:{port}/ready")
        if status == want:
            return body
        assert time.monotonic() < deadline, f"/ready stayed {status}: {body!r}"
        time.sleep(0.5)


def test_metrics_match_what_happened_and_ready_follows_the_database(
        kafka_server: KafkaServer, postgres_server: PostgresServer, db_url: str,
        topics: Topics, tmp_path: Path) -> None:
    messages = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=200, count=20_000, seed=11, anomaly_fraction=0.003,
                        invalid_fraction=0.01)
    svc = Service(service_env(kafka_server.bootstrap, db_url, topics.env()),
                  tmp_path / "service.log").start()
    try:
        port = svc.http_port()
        assert _get(f"http://127.0.0.1:{port}/health")[0] == 200
        wait_consumed(db_url, topics.group, topics.input,
                      end_offsets(kafka_server.bootstrap, topics.input), service=svc)
        _wait_ready(port, 200)
        deadline = time.monotonic() + 60  # a rebalance may still be settling
        while True:
            time.sleep(1.5)  # one more checkpoint after the positions: counters settle
            m = _samples(port)
            if m.get("stream_assigned_partitions") == 6 or time.monotonic() > deadline:
                break
        for name in CONTRACT:
            assert any(k == name or k.startswith((name + "{", name + "_")) for k in m), name
        for name in METRIC_NAMES:
            if name != "stream_worker_restarts_total":  # no restart happened
                assert any(k.startswith(name) for k in m), name
        with psycopg.connect(db_url) as conn:
            rows_1m = conn.execute("SELECT count(*) FROM aggregates_1m").fetchone()[0]
            rows_15m = conn.execute("SELECT count(*) FROM aggregates_15m").fetchone()[0]
        alerts = read_topic(kafka_server.bootstrap, topics.alerts)
        dlq = read_topic(kafka_server.bootstrap, topics.dlq)
        assert m["stream_messages_total"] == len(messages)
        assert m["stream_aggregates_written_total{granularity=1m,window_type=1m}"] == rows_1m
        assert m["stream_aggregates_written_total{granularity=15m,window_type=15m}"] == rows_15m
        # the original service's names and labels (its dashboards)
        assert m["stream_message_processing_duration_ms_count"] == len(messages)
        assert m["stream_aggregation_flush_duration_ms_count{window_type=1m}"] > 0
        assert m["stream_aggregation_flush_duration_ms_count{window_type=15m}"] > 0
        assert m["db_connection_pool_size{state=total}"] >= 2  # 2 workers, a connection each
        assert m["service_uptime_seconds"] > 0
        assert m["kafka_publish_errors_total"] == m["db_write_errors_total"] == 0
        assert m["stream_anomalies_detected_total"] == len(alerts) > 0
        assert m["stream_alerts_published_total"] == len(alerts)
        assert m["stream_invalid_messages_total"] == m["stream_dlq_published_total"] == len(dlq)
        assert m["kafka_consumer_connected"] == m["timescaledb_connected"] == 1
        assert m["stream_assigned_partitions"] == 6

        if postgres_server.local is None:
            pytest.skip("needs the local PostgreSQL server to stop and start it")
        postgres_server.local.stop()
        try:
            body = json.loads(_wait_ready(port, 503))
            assert any("database" in what for what in body["missing"])
        finally:
            postgres_server.local.start()
        _wait_ready(port, 200)
        assert svc.stop() == 0
        # LOG_FORMAT=json: every line is one JSON object, librdkafka's own lines included
        for line in svc.log_text().splitlines():
            assert isinstance(json.loads(line), dict), line
    finally:
        svc.kill()
