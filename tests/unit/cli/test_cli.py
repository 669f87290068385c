"""The command line: help everywhere, one clear line and exit 2 for bad settings."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from segs.cli.main import main

COMMANDS = [[], ["run"], ["migrate"], ["simulate"], ["demo"], ["bench"], ["config", "show"],
            ["config", "check"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "segs-stream")
def test_every_command_explains_itself(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "hunter" not in result.output


def test_help_lists_the_settings() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    for name in ("KAFKA_BROKERS", "POSTGRES_URL", "FLUSH_INTERVAL_1M", "PORT", "LOG_LEVEL"):
        assert name in out


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["run", "--workers", "0"], {}, "WORKERS"),
    (["config", "check"], {"POSTGRES_URL": "not a url"}, "POSTGRES_URL"),
    (["config", "check"], {"FLUSH_INTERVAL_1M": "-1"}, "FLUSH_INTERVAL_1M"),
    (["run"], {"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    (["migrate"], {"POSTGRES_URL": "postgresql://h:notaport/db"}, "POSTGRES_URL"),
])
def test_bad_settings_end_in_one_line_and_exit_2(args: list[str], env: dict[str, str],
                                                 needle: str) -> None:
    result = CliRunner().invoke(main, ["--env-file", "/dev/null", *args], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_config_show_masks_secrets() -> None:
    result = CliRunner().invoke(main, ["--env-file", "/dev/null", "config", "show"],
                                env={"POSTGRES_URL": "postgresql://u:hunter2@h/db",
                                     "KAFKA_SASL_PASSWORD": "hunter3"})
    assert result.exit_code == 0
    assert "hunter" not in result.output
    assert "POSTGRES_URL=postgresql://u:***@h/db" in result.output


def test_migrate_on_an_unreachable_database_is_one_line() -> None:
    result = CliRunner().invoke(main, ["--env-file", "/dev/null", "migrate"],
                                env={"POSTGRES_URL": "postgresql://u@127.0.0.1:1/db"})
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "migration failed" in result.output
