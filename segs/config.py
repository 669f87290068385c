"""Settings: one frozen, typed object built from environment, `.env` file and CLI flags.

Priority, lowest to highest: built-in defaults < `.env` file < process environment < CLI
flags. Every setting is known by its environment-variable name (the names of the original
TypeScript service where one existed); :data:`SPECS` is the single list of them, and
`.env.example` is checked against it by the test suite.

Durations accept a unit suffix (``ms``, ``s``, ``m``, ``h``); a bare number is read in the
unit the setting documents (milliseconds for the ``FLUSH_INTERVAL_*`` pair, as in the original
service, seconds for the others). Internally every duration is held in milliseconds or
seconds with the unit in the field name.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import dotenv_values
from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from segs.errors import ConfigError
from segs.secrets import MASK, is_secret_key, mask_pairs, mask_secrets, mask_url

if TYPE_CHECKING:
    from segs.checkpoint.migrate import Policies

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# the TypeScript service's (pino) level names, as its .env files hold them
_PINO_LEVELS = {"trace": "debug", "warn": "warning", "fatal": "critical"}
LOG_FORMATS = ("auto", "json", "text")
OFFSET_RESETS = ("earliest", "latest")
# what librdkafka can write; kafkajs (the grid system's other services) reads none and gzip
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
# settings of the TypeScript service that have no meaning here: ignored with one info line
OLD_SERVICE_ONLY = ("NODE_ENV",)
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class Secret:
    """A string that never shows itself in logs, reprs or `config show`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def _duration_ms(bare_unit: str) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", raw)
        if not m:
            raise ConfigError(name, f"expected a duration like 500ms, 5s or 2m, got {raw!r}")
        value = float(m.group(1)) * _UNITS_MS[m.group(2) or bare_unit]
        return round(value)

    return parse


def _duration_s(name: str, raw: str) -> float:
    """A duration in seconds (bare number = seconds), for settings named ``…_s``."""
    return _duration_ms("s")(name, raw) / 1000


def _int(low: int, high: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(name, f"must be {bound}, got {value}")
        return value

    return parse


def _float(low: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(name, f"expected a number, got {raw!r}") from None
        if not (value >= low) or value == float("inf"):
            raise ConfigError(name, f"must be a finite number of at least {low}, got {raw!r}")
        return value

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(name, f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _log_level(name: str, raw: str) -> str:
    value = raw.strip().lower()
    return _choice(LOG_LEVELS)(name, _PINO_LEVELS.get(value, value))


def _switch(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ConfigError(name, f"expected on or off, got {raw!r}")


def _days(name: str, raw: str) -> int:
    """Whole days (bare number or ``…d``); 0 or ``off``: none."""
    value = raw.strip().lower()
    if value == "off":
        return 0
    m = re.fullmatch(r"(\d+)\s*d?", value)
    if not m:
        raise ConfigError(name, f"expected a number of days like 30 or 30d, or off, got {raw!r}")
    return int(m.group(1))


def _text(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(name, "must not be empty")
    return value


def _optional_text(name: str, raw: str) -> str:
    return raw.strip()


def _secret(name: str, raw: str) -> Secret:
    return Secret(raw)


def _brokers(name: str, raw: str) -> str:
    value = raw.strip()
    for broker in value.split(","):
        host, sep, port = broker.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(name, f"expected host:port[,host:port…], got {raw!r}")
    return value


def mask_dsn(dsn: str) -> str:
    """A PostgreSQL URL or libpq ``key=value`` string with its secrets masked."""
    return mask_url(dsn) if "://" in dsn else mask_pairs(dsn)


def _postgres_url(name: str, raw: str) -> Secret:
    """A libpq connection string: a URL (one host or several: ``h1:5432,h2:5432``, or
    ``?host=…``) or ``key=value`` pairs, parsed by libpq itself. No error line echoes a
    secret: libpq's own message is given without its quoted parts (they may hold the
    password) and the value only masked."""
    value = raw.strip()
    shown = mask_dsn(value)
    is_url = "://" in value
    scheme, _, rest = value.partition("://")
    if is_url and (scheme not in ("postgres", "postgresql") or not rest):
        raise ConfigError(name, f"expected postgresql://user:password@host:port/db, got {shown!r}")
    try:
        params = conninfo_to_dict(value)
    except ProgrammingError as exc:
        # libpq quotes parts of the value, which may hold the password (with quotes of its
        # own): only the words before its first quote are shown
        first = (str(exc).strip().splitlines() or ["invalid"])[0]
        problem = first.split('"', 1)[0].rstrip(" :") or "invalid connection string"
        raise ConfigError(name, f"libpq cannot parse {shown!r}: {problem}") from None
    if is_url and "user" not in params and "password" not in params \
            and "@" in value.split("?", 1)[0]:
        raise ConfigError(name, f"'/' or '@' in the user name or password must be written "
                                f"as %2F or %40 ({shown!r})")
    hosts = str(params.get("host", "")).split(",")
    ports = str(params.get("port", "")).split(",")
    for i, host in enumerate(hosts, 1):
        if "@" in host and not host.startswith("/"):
            raise ConfigError(name, f"host {i} contains '@': write '@' in the user name or "
                                    f"password as %40 ({shown!r})")
    for i, port in enumerate(ports, 1):  # libpq checks ports only when connecting
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(name, f"port {i} is not a number 1-65535 ({shown!r})")
    if len(ports) not in (1, len(hosts)):
        raise ConfigError(name, f"{len(ports)} ports for {len(hosts)} hosts ({shown!r})")
    return Secret(value)


_KAFKA_KEY = re.compile(r"[a-z][a-z0-9._-]*")  # how librdkafka names its properties


def _kafka_pairs(raw: str, name: str = "KAFKA_EXTRA_CONFIG") -> list[tuple[str, str]]:
    """``key=value[,key=value…]`` as pairs; no error echoes an item (it may be a secret)."""
    items = [p.strip() for p in raw.split(",")]
    pairs = []
    for i, item in enumerate(filter(None, items), 1):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not _KAFKA_KEY.fullmatch(key):  # a piece of a value split at a comma
            raise ConfigError(name, f"item {i} is not key=value with a librdkafka property "
                                    "name (a value cannot hold a comma)")
        pairs.append((key, value))
    return pairs


DEFAULT_REGION_CAPACITY_KW = 1_000_000.0  # of a region REGION_CAPACITY_KW does not name
METER_LISTS = ("full", "none")


def _capacities(name: str, raw: str) -> tuple[tuple[str, float], ...]:
    """``region=kW[,region=kW…]`` as (region, kW) pairs; a region name may hold ``=`` (the
    last one splits), not a comma."""
    out: dict[str, float] = {}
    for i, item in enumerate(filter(None, (p.strip() for p in raw.split(","))), 1):
        region, sep, kw = (x.strip() for x in item.rpartition("="))
        try:
            value = float(kw)
        except ValueError:
            value = float("nan")
        if not sep or not region or not 0 < value < float("inf"):
            raise ConfigError(name, f"item {i} ({item!r}) is not region=kW with kW a "
                                    "positive number")
        out[region] = value
    return tuple(out.items())


def _kafka_extra(name: str, raw: str) -> str:
    _kafka_pairs(raw, name)
    return raw.strip()


@dataclass(frozen=True, slots=True)
class Spec:
    """One setting: environment name, field name, default (as text), parser, meaning."""

    env: str
    field: str
    default: str
    parse: Callable[[str, str], Any]
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("KAFKA_BROKERS", "kafka_brokers", "localhost:9092", _brokers,
         "Kafka bootstrap servers, host:port[,host:port…]"),
    Spec("KAFKA_GROUP_ID", "kafka_group_id", "segs-stream", _text,
         "consumer group shared by every worker and every host"),
    Spec("KAFKA_TOPIC_INPUT", "topic_input", "raw_readings", _text, "topic of raw readings"),
    Spec("KAFKA_TOPIC_AGG_1M", "topic_agg_1m", "aggregates_1m", _text,
         "topic for closed 1-minute windows"),
    Spec("KAFKA_TOPIC_AGG_15M", "topic_agg_15m", "aggregates_15m", _text,
         "topic for closed 15-minute windows"),
    Spec("KAFKA_TOPIC_ALERTS", "topic_alerts", "alerts", _text, "topic for anomaly alerts"),
    Spec("KAFKA_TOPIC_DLQ", "topic_dlq", "raw_readings.dlq", _text,
         "dead-letter topic for invalid messages"),
    Spec("KAFKA_TOPIC_REGIONAL_AGG_1M", "topic_regional_1m", "aggregates_1m_regional", _text,
         "topic for regional 1-minute aggregates (the alert and tariff services read it)"),
    Spec("REGIONAL_AGGREGATES", "regional_aggregates", "on", _switch,
         "on: roll closed 1-minute windows up per region into aggregates_1m_regional (table "
         "and topic); off: neither"),
    Spec("REGIONAL_METER_LIST", "regional_meter_list", "full", _choice(METER_LISTS),
         "full: each regional message lists its meters (active_meters); none: an empty list "
         "and active_meters_omitted=true. A list that would exceed the topic's "
         "max.message.bytes is omitted that way too"),
    Spec("REGION_CAPACITY_KW", "region_capacity_kw", "", _capacities,
         "capacity per region for load_percentage, region=kW[,region=kW…]; a region not "
         "named has 1000000 kW"),
    Spec("KAFKA_CREATE_TOPICS", "kafka_create_topics", "on", _switch,
         "create missing output topics at start (partitions as the input topic, the "
         "broker's replication factor); off: a missing one ends the start with exit code 2"),
    Spec("KAFKA_CLIENT_ID", "kafka_client_id", "segs-stream", _text,
         "client.id of every consumer, producer and admin client (broker logs and quotas)"),
    Spec("KAFKA_COMPRESSION", "kafka_compression", "none", _choice(COMPRESSIONS),
         "compression of the output topics: none or gzip can be read by every Kafka client, "
         "kafkajs included; snappy, lz4 and zstd need codecs kafkajs does not ship"),
    Spec("START_FROM_COMMITTED", "start_from_committed", "on", _switch,
         "a partition with no stored position starts at the consumer group's committed "
         "Kafka offset (e.g. the TypeScript service's), else per KAFKA_AUTO_OFFSET_RESET"),
    Spec("KAFKA_AUTO_OFFSET_RESET", "auto_offset_reset", "earliest", _choice(OFFSET_RESETS),
         "where a partition with neither a stored position nor (with START_FROM_COMMITTED) "
         "a committed offset starts"),
    Spec("KAFKA_SESSION_TIMEOUT", "kafka_session_timeout_ms", "15", _duration_ms("s"),
         "a worker silent this long (crashed, stopped, cut off) leaves the group and its "
         "partitions move to the others; the broker allows 6 s to 30 min"),
    Spec("KAFKA_MAX_POLL_INTERVAL", "kafka_max_poll_interval_ms", "300", _duration_ms("s"),
         "a worker whose loop stalls this long leaves the group (≥ KAFKA_SESSION_TIMEOUT)"),
    Spec("KAFKA_SECURITY_PROTOCOL", "kafka_security_protocol", "", _optional_text,
         "librdkafka security.protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)"),
    Spec("KAFKA_SASL_MECHANISM", "kafka_sasl_mechanism", "", _optional_text,
         "librdkafka sasl.mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"),
    Spec("KAFKA_SASL_USERNAME", "kafka_sasl_username", "", _optional_text, "SASL user name"),
    Spec("KAFKA_SASL_PASSWORD", "kafka_sasl_password", "", _secret,
         "SASL password (never logged)"),
    Spec("KAFKA_SSL_CA_LOCATION", "kafka_ssl_ca_location", "", _optional_text,
         "CA bundle for SSL"),
    Spec("KAFKA_EXTRA_CONFIG", "kafka_extra_config", "", _kafka_extra,
         "more librdkafka settings, key=value[,key=value…], passed through as they are"),
    Spec("POSTGRES_URL", "postgres_url", "postgresql://segs:segs@localhost:5432/segs",
         _postgres_url,
         "PostgreSQL/TimescaleDB URL; TLS via ?sslmode=…&sslrootcert=… (password never logged)"),
    Spec("TIMESCALEDB_RETENTION_1M", "retention_1m_days", "30", _days,
         "TimescaleDB: chunks of aggregates_1m older than this many days are dropped; 0 = "
         "keep all (set by migrate and at start; plain PostgreSQL ignores it)"),
    Spec("TIMESCALEDB_RETENTION_15M", "retention_15m_days", "365", _days,
         "TimescaleDB: the same for aggregates_15m"),
    Spec("TIMESCALEDB_COMPRESS_AFTER_1M", "compress_after_1m_days", "7", _days,
         "TimescaleDB: chunks of aggregates_1m older than this many days are compressed, "
         "segmented by meter; 0 = none. Late readings still merge into them"),
    Spec("TIMESCALEDB_COMPRESS_AFTER_15M", "compress_after_15m_days", "30", _days,
         "TimescaleDB: the same for aggregates_15m"),
    Spec("FLUSH_INTERVAL_1M", "flush_interval_1m_ms", "60000", _duration_ms("ms"),
         "checkpoint interval: partials of both window sizes and positions are written "
         "together at least this often (bare number = ms)"),
    Spec("FLUSH_INTERVAL_15M", "flush_interval_15m_ms", "900000", _duration_ms("ms"),
         "kept for compatibility: the checkpoint runs every min(FLUSH_INTERVAL_1M, "
         "FLUSH_INTERVAL_15M), and 15-minute rows are merged at every checkpoint (bare = ms)"),
    Spec("ALLOWED_LATENESS", "allowed_lateness_ms", "5", _duration_ms("s"),
         "watermark = newest event time − this; later readings still update their row"),
    Spec("IDLE_ADVANCE", "idle_advance_ms", "10", _duration_ms("s"),
         "a partition silent this long has its watermark moved by wall clock"),
    Spec("METER_IDLE_EVICT", "meter_idle_evict_ms", "3600", _duration_ms("s"),
         "a meter with no reading for this much event time gives its memory back at the next "
         "checkpoint; its detector baseline stays stored and is read again when it returns "
         "(0 = never)"),
    Spec("MAX_FUTURE_SKEW", "max_future_skew_ms", "300", _duration_ms("s"),
         "readings further ahead of their message's Kafka timestamp (CreateTime or "
         "LogAppendTime) than this are dead-lettered; never compared with the wall clock"),
    Spec("MAX_MESSAGE_BYTES", "max_message_bytes", "65536", _int(64),
         "larger messages are dead-lettered"),
    Spec("SPIKE_THRESHOLD", "spike_threshold", "1.0", _float(0.0),
         "spike when power exceeds the baseline by more than this fraction"),
    Spec("DROP_THRESHOLD", "drop_threshold", "0.5", _float(0.0),
         "drop when power falls below the baseline by more than this fraction"),
    Spec("ANOMALY_DETECTION", "anomaly_detection", "on", _switch,
         "on: detect spikes, drops and outages and publish alerts; off: aggregates only"),
    Spec("DEDUPLICATE", "deduplicate", "on", _switch,
         "on: a re-sent reading (the same meterId and timestamp) is counted once, in every "
         "aggregate and by the detector; off: every valid message is counted"),
    Spec("MIN_SAMPLES", "min_samples", "10", _int(1),
         "readings a meter needs before it is checked for anomalies"),
    Spec("ALERT_COOLDOWN", "alert_cooldown_ms", "300", _duration_ms("s"),
         "at most one alert per meter and kind within this much event time"),
    Spec("WORKERS", "workers", str(os.cpu_count() or 1), _int(1, 256),
         "worker processes (default: CPU count)"),
    Spec("BATCH_SIZE", "batch_size", "50000", _int(1, 1_000_000),
         "most messages taken from Kafka per poll (fewer when fewer are waiting)"),
    Spec("CHECKPOINT_WRITERS", "checkpoint_writers", "2", _int(1, 16),
         "transactions a worker's checkpoint is cut into (along partitions), written side by "
         "side on their own connections; 1 = one transaction. More help while PostgreSQL has "
         "idle cores"),
    Spec("SHUTDOWN_TIMEOUT", "shutdown_timeout_s", "30", _duration_s,
         "time allowed for the final checkpoint on SIGTERM"),
    Spec("HOST", "http_host", "0.0.0.0", _text,
         "address of the HTTP server (/metrics, /health, /ready); 127.0.0.1 for local only"),
    Spec("PORT", "http_port", "3002", _int(0, 65535), "port of the HTTP server"),
    Spec("LOG_LEVEL", "log_level", "info", _log_level,
         "log level; the TypeScript service's trace, warn and fatal mean debug, warning, "
         "critical"),
    Spec("LOG_FORMAT", "log_format", "auto", _choice(LOG_FORMATS),
         "json, text, or auto (text on a terminal, JSON lines otherwise)"),
)
_BY_FIELD = {s.field: s for s in SPECS}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service, validated, with units in the names."""

    kafka_brokers: str
    kafka_group_id: str
    topic_input: str
    topic_agg_1m: str
    topic_agg_15m: str
    topic_alerts: str
    topic_dlq: str
    topic_regional_1m: str
    regional_aggregates: bool
    regional_meter_list: str
    region_capacity_kw: tuple[tuple[str, float], ...]
    kafka_create_topics: bool
    kafka_client_id: str
    kafka_compression: str
    start_from_committed: bool
    auto_offset_reset: str
    kafka_session_timeout_ms: int
    kafka_max_poll_interval_ms: int
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: Secret
    kafka_ssl_ca_location: str
    kafka_extra_config: str
    postgres_url: Secret
    retention_1m_days: int
    retention_15m_days: int
    compress_after_1m_days: int
    compress_after_15m_days: int
    flush_interval_1m_ms: int
    flush_interval_15m_ms: int
    allowed_lateness_ms: int
    idle_advance_ms: int
    meter_idle_evict_ms: int
    max_future_skew_ms: int
    max_message_bytes: int
    spike_threshold: float
    drop_threshold: float
    anomaly_detection: bool
    deduplicate: bool
    min_samples: int
    alert_cooldown_ms: int
    workers: int
    batch_size: int
    checkpoint_writers: int
    shutdown_timeout_s: float
    http_host: str
    http_port: int
    log_level: str
    log_format: str

    def policies(self) -> Policies:
        """The TimescaleDB policies of the aggregate tables (:mod:`segs.checkpoint.migrate`)."""
        from segs.checkpoint.migrate import Policies

        return Policies(
            {"aggregates_1m": self.retention_1m_days, "aggregates_15m": self.retention_15m_days},
            {"aggregates_1m": self.compress_after_1m_days,
             "aggregates_15m": self.compress_after_15m_days})

    @property
    def checkpoint_interval_ms(self) -> int:
        return min(self.flush_interval_1m_ms, self.flush_interval_15m_ms)

    def kafka_common(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by consumers, producers and admin clients."""
        conf: dict[str, str | int | float | bool] = {"bootstrap.servers": self.kafka_brokers,
                                                     "client.id": self.kafka_client_id}
        if self.kafka_security_protocol:
            conf["security.protocol"] = self.kafka_security_protocol
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get()
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = self.kafka_ssl_ca_location
        conf.update(_kafka_pairs(self.kafka_extra_config))
        return conf

    def describe(self) -> list[tuple[str, str]]:
        """(environment name, shown value) pairs with secrets masked (:mod:`segs.secrets`):
        the database URL's password and secret parameters, the value of every secret
        librdkafka key in ``KAFKA_EXTRA_CONFIG``, and whatever looks like one elsewhere."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "postgres_url":
                shown = mask_dsn(value.get())
            elif f.name == "kafka_extra_config":
                shown = ",".join(f"{k}={MASK if is_secret_key(k) else mask_secrets(v)}"
                                 for k, v in _kafka_pairs(value))
            elif isinstance(value, Secret):
                shown = MASK if value else ""
            elif f.name == "region_capacity_kw":
                shown = mask_secrets(",".join(f"{r}={kw:g}" for r, kw in value))
            else:
                shown = mask_secrets(str(value))
            out.append((_BY_FIELD[f.name].env, shown))
        return out


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a `.env` file as python-dotenv does, which accepts what Node's dotenv accepts
    (the TypeScript service's files): ``export`` prefixes, quoted values, ``#`` comments,
    also after a value and whitespace. No ``${VAR}`` expansion (Node's dotenv has none, and
    a password may hold ``$``). A key without ``=`` is unset; dotenv warns of a line it
    cannot parse by its number, never its text."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(str(path), f"cannot read: {why}") from None
    parsed = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {key: value for key, value in parsed.items() if value is not None}


def ignored_settings(env_file: Path | None, env: Mapping[str, str] | None = None) -> list[str]:
    """Names that are no setting of ours: every unknown key of the `.env` file, and those of
    the TypeScript service's settings that mean nothing here (:data:`OLD_SERVICE_ONLY`)
    found in the environment. The caller says so in one line; none of them is an error."""
    known = {s.env for s in SPECS}
    names = set(read_env_file(env_file)) if env_file is not None else set()
    names.update(k for k in OLD_SERVICE_ONLY if k in (os.environ if env is None else env))
    return sorted(names - known)


def load_settings(
    overrides: Mapping[str, str | int | float | None] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_file: Path | None = Path(".env"),
) -> Settings:
    """Build :class:`Settings`; ``overrides`` are CLI flags keyed by environment name."""
    raw: dict[str, str] = {}
    if env_file is not None:
        raw.update(read_env_file(env_file))
    source = os.environ if env is None else env
    raw.update({s.env: source[s.env] for s in SPECS if s.env in source})
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = str(value)
    values = {s.field: s.parse(s.env, raw.get(s.env, s.default)) for s in SPECS}
    if values["kafka_max_poll_interval_ms"] < values["kafka_session_timeout_ms"]:
        raise ConfigError("KAFKA_MAX_POLL_INTERVAL",
                          "must be at least KAFKA_SESSION_TIMEOUT (librdkafka refuses less)")
    return Settings(**values)
