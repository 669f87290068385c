"""Structured logs: JSON shape, text lines, secrets never reach the output."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from segs.errors import ConfigError
from segs.ops.logs import setup_logging
from segs.secrets import mask_secrets


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_shape_with_extras() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)  # not a TTY: JSON by default
    logging.getLogger("segs.worker").info(
        "assigned %d partitions", 3, extra={"partitions": [0, 1, 2], "group": "g"}
    )
    logging.getLogger("segs.worker").debug("hidden")
    (doc,) = _json_lines(out)
    assert doc["msg"] == "assigned 3 partitions"
    assert doc["level"] == "info"
    assert doc["logger"] == "segs.worker"
    assert doc["process"] == "MainProcess"
    assert isinstance(doc["pid"], int)
    assert doc["partitions"] == [0, 1, 2]
    assert doc["group"] == "g"
    ts = doc["ts"]
    assert isinstance(ts, str) and ts.endswith("Z") and "T" in ts


def test_json_exception() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", json_lines=True, stream=out)
    try:
        raise ValueError("cannot reach postgresql://segs:hunter2@db:5432/segs")
    except ValueError:
        logging.getLogger("x").exception("write failed")
    (doc,) = _json_lines(out)
    assert doc["level"] == "error"
    assert "ValueError" in str(doc["exc"])
    assert "hunter2" not in out.getvalue()
    assert "postgresql://segs:***@db:5432/segs" in str(doc["exc"])


@pytest.mark.parametrize("json_lines", [True, False])
def test_secrets_are_masked(json_lines: bool) -> None:
    out = io.StringIO()
    setup_logging("info", json_lines=json_lines, stream=out)
    log = logging.getLogger("segs.config")
    log.info("kafka config %s", {"sasl.password": "pw-one", "ssl.key.password": "pw-two"})
    log.info("dsn host=db password=pw-three user=segs")
    log.info("url %s", "postgresql://segs:pw-four@timescaledb:5432/segs")
    log.info(
        "settings",
        extra={
            "password": "pw-five",
            "kafka": {"sasl.username": "u", "sasl.password": "pw-six"},
            "postgres_url": "postgres://a:pw-seven@h/db",
        },
    )
    text = out.getvalue()
    for n in ("one", "two", "three", "four", "five", "six", "seven"):
        assert f"pw-{n}" not in text
    assert "***" in text
    assert "sasl.username" in text
    if json_lines:
        docs = _json_lines(out)
        assert docs[3]["password"] == "***"
        assert docs[3]["kafka"] == {"sasl.username": "u", "sasl.password": "***"}
        assert docs[3]["postgres_url"] == "postgres://a:***@h/db"


def test_mask_secrets_leaves_plain_urls() -> None:
    assert mask_secrets("http://processor:3002/metrics") == "http://processor:3002/metrics"
    assert mask_secrets("token='abc' api_key=xyz") == "token='***' api_key=***"


def test_text_on_tty_names_the_process() -> None:
    out = Tty()
    setup_logging("info", stream=out)
    logging.getLogger("segs.supervisor").warning("worker died", extra={"worker": 2})
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).split())
    assert not text.startswith("{")
    assert "MainProcess/" in text
    assert "worker died" in text
    assert "worker=2" in text


def test_plain_text_when_asked_off_tty() -> None:
    out = io.StringIO()
    setup_logging("info", json_lines=False, stream=out)
    logging.getLogger("a").info("hello")
    line = out.getvalue().strip()
    assert "INFO" in line and "[MainProcess/" in line and line.endswith("a: hello")


def test_setup_twice_replaces_the_handler() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)
    setup_logging("info", stream=out)
    logging.getLogger("a").info("once")
    assert len(_json_lines(out)) == 1


def test_bad_level_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        setup_logging("loud")
