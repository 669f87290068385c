"""A `.env` written for the TypeScript service is accepted as it is (issue 19, item 5).

``data/stream-processor.env.example`` is that service's own example file, unchanged
(X-om/smart-energy-grid, ``apps/stream-processor/.env.example``): inline comments after
values, ``NODE_ENV``, its client id and group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from segs.cli.main import main

from segs.config import ignored_settings, load_settings, read_env_file

OLD_ENV = Path(__file__).with_name("data") / "stream-processor.env.example"


def test_the_typescript_services_env_example_loads_as_it_is() -> None:
    s = load_settings(env={}, env_file=OLD_ENV)
    assert s.http_port == 3002
    assert s.log_level == "info"
    assert s.kafka_brokers == "localhost:29092"
    assert s.kafka_client_id == "stream-processor"
    assert s.kafka_group_id == "stream-processor-group"
    assert (s.topic_input, s.topic_agg_1m, s.topic_agg_15m, s.topic_alerts) == (
        "raw_readings", "aggregates_1m", "aggregates_15m", "alerts")
    assert s.postgres_url.get() == "postgres://postgres:password@localhost:5432/segs"
    assert (s.flush_interval_1m_ms, s.flush_interval_15m_ms) == (60_000, 900_000)
    assert s.kafka_common()["client.id"] == "stream-processor"
    assert s.start_from_committed  # the cut-over resumes where that group stopped


def test_its_unknown_settings_are_named_once_and_ignored() -> None:
    assert ignored_settings(OLD_ENV, env={}) == ["NODE_ENV"]
    out = CliRunner().invoke(main, ["--env-file", str(OLD_ENV), "config", "check"], env={})
    assert out.exit_code == 0, out.output
    assert out.output == ("ignored, not settings of segs-stream: NODE_ENV\n"
                          "configuration ok\n")


def test_node_env_in_the_environment_is_named_too(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    assert ignored_settings(empty, env={"NODE_ENV": "production", "PATH": "/bin"}) == [
        "NODE_ENV"]
    assert ignored_settings(empty, env={"PATH": "/bin"}) == []
    out = CliRunner().invoke(main, ["--env-file", str(empty), "config", "check"],
                             env={"NODE_ENV": None})
    assert out.output == "configuration ok\n"


@pytest.mark.parametrize(("line", "value"), [
    ("FLUSH_INTERVAL_1M=60000       # 60 seconds", "60000"),
    ("FLUSH_INTERVAL_1M=60000\t# tab before the comment", "60000"),
    ("export FLUSH_INTERVAL_1M=60000", "60000"),
    ("FLUSH_INTERVAL_1M='60000' # quoted", "60000"),
    ('KAFKA_GROUP_ID="group # not a comment"', "group # not a comment"),
    ("KAFKA_GROUP_ID=a#b", "a#b"),  # no whitespace before '#': part of the value
    ("KAFKA_GROUP_ID = spaced ", "spaced"),
    ("KAFKA_SASL_PASSWORD=pa$word${HOME}", "pa$word${HOME}"),  # no expansion, as Node's
])
def test_dotenv_syntax(tmp_path: Path, line: str, value: str) -> None:
    path = tmp_path / ".env"
    path.write_text(f"# a comment\n\n{line}\n")
    assert list(read_env_file(path).values()) == [value]


def test_a_key_without_value_is_unset_and_a_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("LOG_LEVEL\nPORT=4000\n")
    assert read_env_file(path) == {"PORT": "4000"}
    assert read_env_file(tmp_path / "absent") == {}
    assert load_settings(env={}, env_file=path).log_level == "info"


@pytest.mark.parametrize(("old", "ours"), [("trace", "debug"), ("warn", "warning"),
                                           ("fatal", "critical"), ("INFO", "info")])
def test_the_old_services_log_levels_are_understood(old: str, ours: str) -> None:
    assert load_settings(env={"LOG_LEVEL": old}, env_file=None).log_level == ours
