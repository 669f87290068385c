"""Settings: sources in priority order, validation with one clear message, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from segs.config import SPECS, Secret, load_settings
from segs.errors import ConfigError
from segs.secrets import mask_url


def test_defaults_are_the_original_services() -> None:
    s = load_settings(env={}, env_file=None)
    assert (s.kafka_brokers, s.kafka_group_id, s.topic_input) == (
        "localhost:9092", "segs-stream", "raw_readings")
    assert (s.topic_agg_1m, s.topic_agg_15m, s.topic_alerts, s.topic_dlq) == (
        "aggregates_1m", "aggregates_15m", "alerts", "raw_readings.dlq")
    assert s.http_port == 3002 and s.allowed_lateness_ms == 5000
    assert s.flush_interval_1m_ms == 60_000 and s.checkpoint_interval_ms == 60_000
    assert s.alert_cooldown_ms == 300_000 and s.min_samples == 10


def test_priority_file_then_environment_then_flags(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=4000\nLOG_LEVEL=debug\n# comment\nexport KAFKA_GROUP_ID='g1'\n")
    s = load_settings(env={"PORT": "5000"}, env_file=env_file)
    assert (s.http_port, s.log_level, s.kafka_group_id) == (5000, "debug", "g1")
    s = load_settings({"PORT": 6000}, env={"PORT": "5000"}, env_file=env_file)
    assert s.http_port == 6000


def test_durations_take_units_and_bare_numbers_their_documented_unit() -> None:
    s = load_settings(env={"FLUSH_INTERVAL_1M": "1500", "ALLOWED_LATENESS": "250ms",
                           "ALERT_COOLDOWN": "2m", "SHUTDOWN_TIMEOUT": "10"}, env_file=None)
    assert s.flush_interval_1m_ms == 1500
    assert s.allowed_lateness_ms == 250
    assert s.alert_cooldown_ms == 120_000
    assert s.shutdown_timeout_s == 10


@pytest.mark.parametrize(("env", "setting"), [
    ({"POSTGRES_URL": "mysql://x"}, "POSTGRES_URL"),
    ({"POSTGRES_URL": "postgresql://u:p@h:99999/d"}, "POSTGRES_URL"),
    ({"FLUSH_INTERVAL_1M": "-5"}, "FLUSH_INTERVAL_1M"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"WORKERS": "0"}, "WORKERS"),
    ({"KAFKA_BROKERS": "no-port"}, "KAFKA_BROKERS"),
    ({"PORT": "http"}, "PORT"),
    ({"SPIKE_THRESHOLD": "nan"}, "SPIKE_THRESHOLD"),
    ({"ANOMALY_DETECTION": "maybe"}, "ANOMALY_DETECTION"),
    ({"KAFKA_EXTRA_CONFIG": "novalue"}, "KAFKA_EXTRA_CONFIG"),
])
def test_a_bad_setting_names_itself_in_one_line(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, env_file=None)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert "\n" not in str(info.value)


def test_secrets_never_show() -> None:
    s = load_settings(env={"POSTGRES_URL": "postgresql://segs:hunter2@db:5432/segs",
                           "KAFKA_SASL_PASSWORD": "hunter3"}, env_file=None)
    shown = dict(s.describe())
    assert "hunter2" not in repr(s) and "hunter3" not in repr(s)
    assert shown["POSTGRES_URL"] == "postgresql://segs:***@db:5432/segs"
    assert shown["KAFKA_SASL_PASSWORD"] == "***"
    assert str(Secret("x")) == "Secret('***')"
    assert mask_url("postgresql://a:b@c/d") == "postgresql://a:***@c/d"


def test_kafka_security_settings_pass_through_to_librdkafka() -> None:
    s = load_settings(env={
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": "pw",
        "KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
        "KAFKA_EXTRA_CONFIG": "ssl.endpoint.identification.algorithm=https, client.rack=r1",
    }, env_file=None)
    conf = s.kafka_common()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("svc", "pw")
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    assert conf["client.rack"] == "r1"


def test_env_example_lists_every_setting() -> None:
    text = (Path(__file__).parents[2] / ".env.example").read_text()
    for spec in SPECS:
        assert f"{spec.env}=" in text, spec.env


def test_checkpoint_writers_default_is_the_sinks() -> None:
    from segs.checkpoint.sink import DEFAULT_WRITERS

    assert load_settings(env={}, env_file=None).checkpoint_writers == DEFAULT_WRITERS


def test_output_compression_defaults_to_none_and_takes_librdkafkas_codecs() -> None:
    assert load_settings(env={}, env_file=None).kafka_compression == "none"
    for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
        s = load_settings(env={"KAFKA_COMPRESSION": codec.upper()}, env_file=None)
        assert s.kafka_compression == codec
    with pytest.raises(ConfigError, match="KAFKA_COMPRESSION"):
        load_settings(env={"KAFKA_COMPRESSION": "brotli"}, env_file=None)


def test_client_id_is_every_clients() -> None:
    assert load_settings(env={}, env_file=None).kafka_common()["client.id"] == "segs-stream"
    s = load_settings(env={"KAFKA_CLIENT_ID": "stream-processor"}, env_file=None)
    assert s.kafka_common()["client.id"] == "stream-processor"


def test_timescaledb_policies_in_days_with_the_original_defaults() -> None:
    s = load_settings(env={}, env_file=None)
    assert (s.retention_1m_days, s.retention_15m_days) == (30, 365)
    assert (s.compress_after_1m_days, s.compress_after_15m_days) == (7, 30)
    s = load_settings(env={"TIMESCALEDB_RETENTION_1M": "off", "TIMESCALEDB_RETENTION_15M": "90d",
                           "TIMESCALEDB_COMPRESS_AFTER_1M": "0"}, env_file=None)
    assert s.policies().retention_days == {"aggregates_1m": 0, "aggregates_15m": 90}
    assert s.policies().compress_after_days == {"aggregates_1m": 0, "aggregates_15m": 30}
    with pytest.raises(ConfigError, match="TIMESCALEDB_COMPRESS_AFTER_15M"):
        load_settings(env={"TIMESCALEDB_COMPRESS_AFTER_15M": "2h"}, env_file=None)
