"""Every Prometheus metric of the service, defined once, safe in multiprocess mode.

The names are those of the original TypeScript service (``docs/contract.md``, "Operation")
plus a few new ones. Workers count per batch, never per message. The original's dashboards select
aggregate and flush metrics by ``window_type`` (``1m``, ``15m``, ``1m_regional``): those
carry it beside our ``granularity`` (the same value), and its other metrics are exported
under its names too (``db_write_errors_total``, ``kafka_publish_errors_total``,
``db_connection_pool_size``, ``service_uptime_seconds``,
``stream_message_processing_duration_ms``, ``stream_aggregation_flush_duration_ms``).

Multiprocess mode (the documented way, see prometheus ``client_python``):

1. The supervisor calls :func:`prepare_multiprocess_dir` before it spawns any worker. It
   deletes the folder's Prometheus files, sets ``PROMETHEUS_MULTIPROC_DIR`` in ``os.environ``
   (spawned workers inherit it, so their metrics write to per-process files from the start)
   and re-binds the supervisor's own metrics to that folder, whether this module was
   imported before or after.
2. ``/metrics`` calls :func:`render_latest`, which builds a fresh ``CollectorRegistry`` with a
   ``MultiProcessCollector`` on every scrape.
3. When a worker exits, the supervisor calls :func:`mark_dead` with its pid, which drops the
   files of its ``live*`` gauges; its counters and histograms stay (they are cumulative).

Each gauge has a deliberate ``multiprocess_mode``, given beside its definition. Note that
every process importing this module holds a 0 for each unlabelled gauge: modes are chosen so
that a 0 from the supervisor (which counts no messages) cannot distort the result, and the
supervisor's placeholders of the ``livemin`` "connected" gauges are removed (step 1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from segs.windows.sizes import REGIONAL_GRANULARITY, SIZES

ENV_MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"

# An empty PROMETHEUS_MULTIPROC_DIR means unset: prometheus_client would take it for
# multiprocess mode in the working directory and leave its files there.
if os.environ.get(ENV_MULTIPROC_DIR) == "":
    del os.environ[ENV_MULTIPROC_DIR]
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

# In multiprocess mode the metrics below open their files as soon as they are defined: make
# sure a folder named by the environment (e.g. a systemd unit's) exists rather than crash.
if os.environ.get(ENV_MULTIPROC_DIR):
    Path(os.environ[ENV_MULTIPROC_DIR]).mkdir(parents=True, exist_ok=True)

_SECONDS_FAST: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SECONDS_SLOW: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_MILLISECONDS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# the original service's buckets, so its dashboards' quantiles read the same
_FLUSH_MS: Final = (10, 50, 100, 250, 500, 1000, 2500, 5000)
_MESSAGE_MS: Final = (1, 5, 10, 25, 50, 100, 250)
# label values of window_type
WINDOW_TYPES: Final = (*(size.granularity for size in SIZES), REGIONAL_GRANULARITY)
# label values of db_write_errors_total
DB_OPERATIONS: Final = ("checkpoint", "publish", "load_positions", "load_baselines")
_BATCH_SIZES: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)

# --- counters (summed over every process, dead ones included) -------------------------------

MESSAGES = Counter("stream_messages_total", "Messages consumed from the input topic")
AGGREGATES_WRITTEN = Counter(
    "stream_aggregates_written_total",
    "Aggregate rows upserted into the database",
    ["granularity", "window_type"],  # both 1m | 15m | 1m_regional (window_type: the original's)
)
AGGREGATES_PUBLISHED = Counter(
    "stream_aggregates_published_total",
    "Aggregates published to Kafka",
    ["granularity", "window_type"],  # both 1m | 15m | 1m_regional (window_type: the original's)
)
ANOMALIES_DETECTED = Counter(
    "stream_anomalies_detected_total",
    "Anomalies detected",
    ["type"],  # outage | spike | drop
)
ALERTS_PUBLISHED = Counter("stream_alerts_published_total", "Alerts published to Kafka")
INVALID_MESSAGES = Counter(
    "stream_invalid_messages_total",
    "Messages rejected by validation and sent to the dead-letter topic",
    ["reason"],
)
LATE_READINGS = Counter(
    "stream_late_readings_total", "Valid readings for a window that was already closed"
)
DUPLICATE_READINGS = Counter(
    "stream_duplicate_readings_total",
    "Valid readings not counted: their (meterId, timestamp) was counted already (DEDUPLICATE)",
)
DLQ_PUBLISHED = Counter("stream_dlq_published_total", "Messages published to the dead-letter topic")
PUBLISH_ERRORS = Counter(
    "kafka_publish_errors_total",
    "Messages Kafka refused for good (they are produced again; see stream_undelivered_messages)",
    ["topic"],
)
DLQ_TRUNCATED = Counter(
    "stream_dlq_truncated_total",
    "Dead letters cut to fit the dead-letter topic's max.message.bytes",
)
METERS_EVICTED = Counter(
    "stream_meters_evicted_total",
    "Meters idle for METER_IDLE_EVICT whose memory was given back (their baselines stay "
    "stored and are read again when they return)",
)
WORKER_RESTARTS = Counter(
    "stream_worker_restarts_total", "Worker processes restarted by the supervisor"
)
DB_WRITE_ERRORS = Counter(
    "db_write_errors_total",
    "Database writes that failed (retried): checkpoint transactions, publish claims, "
    "position and baseline loads",
    ["operation"],  # DB_OPERATIONS
)
DB_WRITE_ROWS = Counter(
    "db_write_rows_total",
    "Rows written to the database",
    ["table"],  # aggregates_1m | aggregates_15m | baselines | positions …
)

# --- histograms (buckets summed over every process) ------------------------------------------

FLUSH_DURATION = Histogram(
    "stream_aggregation_flush_duration",
    "Seconds to flush window aggregates (database write and publish)",
    buckets=_SECONDS_SLOW,
)
FLUSH_DURATION_MS = Histogram(
    "stream_aggregation_flush_duration_ms",
    "Milliseconds from a checkpoint's database write to its closed windows of this type "
    "published (the original service's flush metric)",
    ["window_type"],
    buckets=_FLUSH_MS,
)
DB_WRITE_LATENCY_MS = Histogram(
    "db_write_latency_ms", "Milliseconds of one database write transaction", buckets=_MILLISECONDS
)
CHECKPOINT_DURATION = Histogram(
    "stream_checkpoint_duration_seconds",
    "Seconds of one checkpoint (transaction, producer flush, bookkeeping)",
    buckets=_SECONDS_SLOW,
)
BATCH_SIZE = Histogram("stream_batch_size", "Messages per consumed batch", buckets=_BATCH_SIZES)
PROCESSING_SECONDS = Histogram(
    "stream_processing_seconds",
    "Seconds to process one consumed batch (decode, windows, anomalies)",
    buckets=_SECONDS_FAST,
)
MESSAGE_PROCESSING_MS = Histogram(
    "stream_message_processing_duration_ms",
    "Milliseconds of processing per message: each message of a batch observes the batch's "
    "time divided by its size (counted once per batch)",
    buckets=_MESSAGE_MS,
)

# --- gauges ------------------------------------------------------------------------------------

# livemax: a partition is owned by one worker at a time; during a rebalance the old and the
# new owner may both report it for a moment, and the larger (more alarming) lag is the safe
# answer. Workers remove the label of a revoked partition; a dead worker's values vanish.
LAG_SECONDS = Gauge(
    "stream_lag_seconds",
    "Wall clock minus event time of the newest processed reading",
    ["partition"],
    multiprocess_mode="livemax",
)
CONSUMER_OFFSET_LAG = Gauge(
    "stream_consumer_offset_lag",
    "High watermark minus the next offset to consume",
    ["partition"],
    multiprocess_mode="livemax",
)
# livesum: each worker holds its own windows and partitions; the service total is the sum
# over the live workers (a dead worker's windows are gone from memory, so are its values).
WINDOWED_READINGS = Gauge(
    "stream_windowed_readings_gauge",
    "Readings held in open windows",
    multiprocess_mode="livesum",
)
WINDOW_BUCKETS = Gauge(
    "stream_window_buckets_gauge",
    "Open (meter, window) buckets held in memory",
    multiprocess_mode="livesum",
)
METERS_HELD = Gauge(
    "stream_meters_held",
    "Meter ids held in memory (read within METER_IDLE_EVICT, or not yet checkpointed)",
    multiprocess_mode="livesum",
)
ASSIGNED_PARTITIONS = Gauge(
    "stream_assigned_partitions",
    "Input partitions assigned to the live workers",
    multiprocess_mode="livesum",
)
# livesum: each worker waits on its own undelivered messages.
UNDELIVERED = Gauge(
    "stream_undelivered_messages",
    "Dead letters and alerts Kafka refused, held while intake is paused until delivered",
    multiprocess_mode="livesum",
)
# livesum: each worker has its own pool; total = connections, idle = ready for use,
# waiting = requests queued for a connection.
DB_POOL_SIZE = Gauge(
    "db_connection_pool_size",
    "Database connections of the live workers' pools",
    ["state"],  # total | idle | waiting
    multiprocess_mode="livesum",
)
# livemax: set by the supervisor (or the one process) when /metrics is rendered; the
# workers' placeholder 0 never wins.
SERVICE_UPTIME = Gauge(
    "service_uptime_seconds",
    "Seconds since the service started",
    multiprocess_mode="livemax",
)
_STARTED = time.monotonic()

# livemax: every worker measures it after each of its checkpoints; the largest is the truth
# while one worker's value may be a checkpoint older than another's.
REGIONAL_WAITING_SECONDS = Gauge(
    "stream_regional_oldest_waiting_seconds",
    "Age past its end of the oldest region-window not yet published (0 when none): grows "
    "while a partition's stored watermark holds regional aggregates back",
    multiprocess_mode="livemax",
)
# mostrecent: the worker that published a region's newest window last says its load; a
# late window re-published does not move it back (segs.runtime.checkpointer). One series per region.
REGIONAL_LOAD = Gauge(
    "stream_regional_load_percentage",
    "load_percentage of the newest regional 1-minute aggregate published, per region",
    ["region"],
    multiprocess_mode="mostrecent",
)
# livemin: 1 only when every live worker is connected, so one disconnected worker shows as 0.
# The supervisor's own 0 placeholders are removed by prepare_multiprocess_dir, so the gauges
# are absent (not 0) while no worker is alive: alert rules check absent() as well.
KAFKA_CONSUMER_CONNECTED = Gauge(
    "kafka_consumer_connected",
    "1 when the worker's Kafka consumer is connected",
    multiprocess_mode="livemin",
)
KAFKA_PRODUCER_CONNECTED = Gauge(
    "kafka_producer_connected",
    "1 when the worker's Kafka producer is connected",
    multiprocess_mode="livemin",
)
TIMESCALEDB_CONNECTED = Gauge(
    "timescaledb_connected",
    "1 when the worker's database pool is connected",
    multiprocess_mode="livemin",
)

_ALL: Final[tuple[Counter | Gauge | Histogram, ...]] = (
    MESSAGES,
    AGGREGATES_WRITTEN,
    AGGREGATES_PUBLISHED,
    ANOMALIES_DETECTED,
    ALERTS_PUBLISHED,
    INVALID_MESSAGES,
    LATE_READINGS,
    DUPLICATE_READINGS,
    DLQ_PUBLISHED,
    PUBLISH_ERRORS,
    DLQ_TRUNCATED,
    METERS_EVICTED,
    WORKER_RESTARTS,
    DB_WRITE_ERRORS,
    DB_WRITE_ROWS,
    FLUSH_DURATION,
    FLUSH_DURATION_MS,
    DB_WRITE_LATENCY_MS,
    CHECKPOINT_DURATION,
    BATCH_SIZE,
    PROCESSING_SECONDS,
    MESSAGE_PROCESSING_MS,
    LAG_SECONDS,
    CONSUMER_OFFSET_LAG,
    WINDOWED_READINGS,
    WINDOW_BUCKETS,
    METERS_HELD,
    ASSIGNED_PARTITIONS,
    UNDELIVERED,
    DB_POOL_SIZE,
    SERVICE_UPTIME,
    REGIONAL_WAITING_SECONDS,
    REGIONAL_LOAD,
    KAFKA_CONSUMER_CONNECTED,
    KAFKA_PRODUCER_CONNECTED,
    TIMESCALEDB_CONNECTED,
)


def _exported_name(metric: Counter | Gauge | Histogram) -> str:
    name: str = metric._name  # the family name, without the _total suffix
    return f"{name}_total" if isinstance(metric, Counter) else name


METRIC_NAMES: Final[tuple[str, ...]] = tuple(_exported_name(m) for m in _ALL)
"""Every exported base name: counters with ``_total``, histograms without ``_bucket`` etc."""


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> None:
    """Empty ``path`` of ``*.db`` files (creating it), point the env var at it, re-bind metrics.

    Called by the supervisor once, before it counts anything and before it spawns workers.
    Prometheus files of earlier runs are deleted (a stale file of a reused pid would
    resurrect old counts); other files are left alone. This process's metrics are re-bound
    to fresh files in ``path``, then its placeholders of the ``livemin`` gauges are dropped
    (see the module docstring).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _close_value_files()
    for stale in folder.glob("*.db"):  # only Prometheus files: the folder may be shared
        stale.unlink(missing_ok=True)
    os.environ[ENV_MULTIPROC_DIR] = str(folder)
    _rebind_values()
    (folder / f"gauge_livemin_{os.getpid()}.db").unlink(missing_ok=True)


def disable_multiprocess() -> None:
    """Back to in-memory values in the default registry (tests, single-process commands)."""
    _close_value_files()
    os.environ.pop(ENV_MULTIPROC_DIR, None)
    os.environ.pop(ENV_MULTIPROC_DIR.lower(), None)
    _rebind_values()


def mark_dead(pid: int) -> None:
    """Drop the ``live*`` gauge files of an exited worker (no-op outside multiprocess mode)."""
    path = os.environ.get(ENV_MULTIPROC_DIR)
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def forget_partition(partition: int | str) -> None:
    """Retire this process's per-partition gauges of a revoked partition.

    In multiprocess mode a value file cannot forget a series (``Gauge.remove`` only warns),
    so the gauges are set to 0, which the ``livemax`` mode ignores next to the new owner's
    value. In a single process the series is removed.
    """
    label = str(partition)
    for gauge in (LAG_SECONDS, CONSUMER_OFFSET_LAG):
        if os.environ.get(ENV_MULTIPROC_DIR):
            gauge.labels(label).set(0)
        else:
            gauge.remove(label)


def observe_each(histogram: Histogram, amount: float, count: int) -> None:
    """``count`` observations of ``amount`` at the cost of one: the per-message histogram of
    a batch (prometheus_client has no weighted observe; its buckets are held per bound)."""
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    histogram._sum.inc(amount * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(count)
            break


def start_series(topics: tuple[str, ...]) -> None:
    """Show every error counter's series at 0 from the start, so rules and dashboards see
    a series before the first error (a labelled counter is absent until first counted)."""
    for topic in topics:
        PUBLISH_ERRORS.labels(topic)
    for operation in DB_OPERATIONS:
        DB_WRITE_ERRORS.labels(operation)


def render_latest() -> tuple[bytes, str]:
    """The exposition body and its content type, aggregated over all processes if enabled."""
    SERVICE_UPTIME.set(int(time.monotonic() - _STARTED))
    if os.environ.get(ENV_MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _close_value_files() -> None:
    if getattr(values.ValueClass, "_multiprocess", False):
        values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]


def _rebind_values() -> None:
    """Re-create the value of every metric (and labelled child) with the current value class.

    ``prometheus_client`` picks in-memory or file-backed values when it is first imported;
    this makes the choice follow ``PROMETHEUS_MULTIPROC_DIR`` at the time of the call, so
    the import order of this module does not matter. Children already handed out by
    ``labels()`` are re-bound in place, so references held by callers stay valid.
    """
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    for metric in _ALL:
        children = getattr(metric, "_metrics", None)
        if children is None:
            metric._metric_init()
        else:
            for child in list(children.values()):
                child._metric_init()
