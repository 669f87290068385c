"""Prometheus multiprocess mode: worker values reach /metrics, dead workers' gauges vanish."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from segs.ops import metrics


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _worker_body(messages: int) -> None:
    """Runs in a spawned child: what a worker would count."""
    from segs.ops import metrics as m

    m.MESSAGES.inc(messages)
    m.AGGREGATES_WRITTEN.labels(granularity="1m", window_type="1m").inc(7)
    m.start_series(("alerts",))
    m.DB_POOL_SIZE.labels(state="total").set(3)
    m.observe_each(m.MESSAGE_PROCESSING_MS, 0.02, messages)
    m.ANOMALIES_DETECTED.labels(type="spike").inc()
    m.DB_WRITE_LATENCY_MS.observe(12.0)
    m.WINDOWED_READINGS.set(100)
    m.LAG_SECONDS.labels(partition="3").set(2.5)
    m.TIMESCALEDB_CONNECTED.set(1)
    m.KAFKA_CONSUMER_CONNECTED.set(1)


def _spawn(messages: int) -> int:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_worker_body, args=(messages,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert proc.pid is not None
    return proc.pid


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "prom"
    metrics.prepare_multiprocess_dir(folder)
    yield folder
    metrics.disable_multiprocess()


def test_names_are_unique_and_complete() -> None:
    assert len(set(metrics.METRIC_NAMES)) == len(metrics.METRIC_NAMES)
    for name in (
        "stream_messages_total",
        "stream_aggregates_written_total",
        "stream_aggregates_published_total",
        "stream_anomalies_detected_total",
        "stream_alerts_published_total",
        "stream_aggregation_flush_duration",
        "db_write_latency_ms",
        "stream_lag_seconds",
        "stream_windowed_readings_gauge",
        "stream_window_buckets_gauge",
        "kafka_consumer_connected",
        "kafka_producer_connected",
        "timescaledb_connected",
    ):
        assert name in metrics.METRIC_NAMES


def test_prepare_sets_env_and_empties(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"stale")
    (folder / "keep.txt").write_text("not ours")
    try:
        metrics.prepare_multiprocess_dir(folder)
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
        assert not (folder / "counter_1.db").exists()
        assert (folder / "keep.txt").exists()
    finally:
        metrics.disable_multiprocess()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_spawned_workers_values_are_aggregated(multiproc_dir: Path) -> None:
    _spawn(10)
    _spawn(5)
    body, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    s = _samples(body)
    assert s[("stream_messages_total", ())] == 15
    assert s[("stream_aggregates_written_total",
              (("granularity", "1m"), ("window_type", "1m")))] == 14
    assert s[("kafka_publish_errors_total", (("topic", "alerts"),))] == 0
    assert s[("db_write_errors_total", (("operation", "checkpoint"),))] == 0
    assert s[("db_connection_pool_size", (("state", "total"),))] == 6  # livesum
    assert s[("stream_message_processing_duration_ms_count", ())] == 15
    assert s[("stream_message_processing_duration_ms_bucket", (("le", "1.0"),))] == 15
    assert s[("service_uptime_seconds", ())] >= 0  # the supervisor's, at rendering
    assert s[("stream_anomalies_detected_total", (("type", "spike"),))] == 2
    assert s[("db_write_latency_ms_count", ())] == 2
    assert s[("db_write_latency_ms_bucket", (("le", "25.0"),))] == 2
    # both children exited without mark_dead: live gauges still count them
    assert s[("stream_windowed_readings_gauge", ())] == 200
    assert s[("stream_lag_seconds", (("partition", "3"),))] == 2.5
    # every unlabelled metric is exported, even those nobody touched
    exported = {name for name, _ in s}
    for name, metric in zip(metrics.METRIC_NAMES, metrics._ALL, strict=True):
        if not metric._labelnames:
            assert name in exported or f"{name}_count" in exported, name


def test_mark_dead_drops_live_gauges_keeps_counters(multiproc_dir: Path) -> None:
    pid = _spawn(3)
    metrics.mark_dead(pid)
    s = _samples(metrics.render_latest()[0])
    assert s[("stream_messages_total", ())] == 3
    assert ("stream_lag_seconds", (("partition", "3"),)) not in s
    assert s.get(("stream_windowed_readings_gauge", ()), 0.0) == 0.0
    # the supervisor holds no placeholder for the livemin gauges: absent, not 0
    assert ("timescaledb_connected", ()) not in s


def test_connected_gauge_is_min_over_live_workers(multiproc_dir: Path) -> None:
    _spawn(1)
    s = _samples(metrics.render_latest()[0])
    assert s[("timescaledb_connected", ())] == 1
    assert s[("kafka_producer_connected", ())] == 0  # the child never connected its producer


def test_supervisor_counts_after_prepare(multiproc_dir: Path) -> None:
    metrics.WORKER_RESTARTS.inc()
    metrics.INVALID_MESSAGES.labels(reason="not_json").inc(2)
    s = _samples(metrics.render_latest()[0])
    assert s[("stream_worker_restarts_total", ())] == 1
    assert s[("stream_invalid_messages_total", (("reason", "not_json"),))] == 2
    assert any(p.name.startswith("counter_") for p in multiproc_dir.iterdir())


def test_single_process_uses_default_registry() -> None:
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    before = _samples(metrics.render_latest()[0]).get(("stream_late_readings_total", ()), 0.0)
    metrics.LATE_READINGS.inc(4)
    s = _samples(metrics.render_latest()[0])
    assert s[("stream_late_readings_total", ())] == before + 4
    assert any(name.startswith("python_") for name, _ in s)
    metrics.mark_dead(12345)  # a no-op without a folder


def _revoke_body() -> None:
    from segs.ops import metrics as m

    m.LAG_SECONDS.labels(partition="1").set(30)
    m.CONSUMER_OFFSET_LAG.labels(partition="1").set(500)
    m.forget_partition(1)


def test_forget_partition_multiprocess(multiproc_dir: Path) -> None:
    metrics.LAG_SECONDS.labels(partition="1").set(4)  # the new owner, still alive
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_revoke_body)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    s = _samples(metrics.render_latest()[0])
    assert s[("stream_lag_seconds", (("partition", "1"),))] == 4
    assert s[("stream_consumer_offset_lag", (("partition", "1"),))] == 0


def test_forget_partition_single_process() -> None:
    metrics.LAG_SECONDS.labels(partition="9").set(3)
    metrics.forget_partition(9)
    metrics.forget_partition(9)
    s = _samples(metrics.render_latest()[0])
    assert ("stream_lag_seconds", (("partition", "9"),)) not in s


def test_a_run_removes_only_the_metrics_folder_it_made(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR each run made a folder in the temp dir and left it
    there: 1,425 of them after a day of tests."""
    from segs.runtime.supervisor import prepare_metrics_dir, remove_metrics_dir

    given = tmp_path / "given"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    try:
        assert prepare_metrics_dir() == (str(given), False)  # the operator's: kept
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr("tempfile.tempdir", None)
        folder, own = prepare_metrics_dir()
        assert own
        assert folder == str(tmp_path / f"segs-stream-metrics-{os.getpid()}")
        assert Path(folder).is_dir()
    finally:
        metrics.disable_multiprocess()
    remove_metrics_dir(folder)
    assert not Path(folder).exists()
    assert given.is_dir()


def test_observe_each_equals_as_many_observations() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    one = Histogram("one_ms", "", buckets=(1, 5, 10), registry=registry)
    many = Histogram("many_ms", "", buckets=(1, 5, 10), registry=registry)
    for amount, count in ((0.5, 3), (5.0, 2), (7.5, 4), (50.0, 1)):
        for _ in range(count):
            one.observe(amount)
        metrics.observe_each(many, amount, count)
    values: dict[str, dict[tuple[str, ...], float]] = {"one": {}, "many": {}}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                prefix, rest = s.name.split("_", 1)
                values[prefix][(rest, s.labels.get("le", ""))] = s.value
    assert values["one"] == values["many"]
    assert values["many"][("ms_count", "")] == 10


def test_uptime_is_set_when_rendered() -> None:
    metrics.SERVICE_UPTIME.set(-1)
    body, _ = metrics.render_latest()
    assert _samples(body)[("service_uptime_seconds", ())] >= 0
