"""Structured logging for the supervisor and every worker process.

:func:`setup_logging` is called once per process (workers are spawned, so each configures
its own root logger). Logger names are part of the output operators filter on, so each
module names its logger explicitly (``segs.worker``, ``segs.sink`` …), not by ``__name__``:
moving a module does not rename its logger. Output goes to stderr:

- JSON lines when stderr is not a terminal (systemd journal, containers, files) or when asked:
  ``{"ts", "level", "logger", "msg", "process", "pid", …extra fields, "exc"}``;
- readable lines through rich on a terminal (plain lines when not a terminal but text is asked).

Every handler installed here carries :class:`SecretFilter`: values of secret-looking keys
(``password``, ``sasl.password``, ``ssl.key.password``, tokens …), in ``extra`` fields and in
``key=value`` text, and the password of ``user:pass@`` URLs are replaced by ``***`` before
anything is formatted, by the same rules as ``config show`` (:mod:`segs.secrets`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, TextIO

from segs.errors import ConfigError
from segs.secrets import MASK, is_secret_key, mask_secrets

SAY_EVERY_S = 60.0
"""A lasting failure is logged when it starts and then once this often, never per event."""

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_HANDLER_MARK: Final = "_segs_handler"


def mask_value(key: str, value: object) -> object:
    """A structured value with secrets masked, recursing into mappings and sequences."""
    if is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, Mapping):
        return {str(k): mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_value("", v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask_secrets(str(value))


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra=`` fields of a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


class SecretFilter(logging.Filter):
    """Masks secrets in the message, its arguments, ``extra`` fields and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw text, still masked
            message = f"{record.msg} {record.args}"
        record.msg = mask_secrets(message)
        record.args = None
        for key, value in extra_fields(record).items():
            setattr(record, key, mask_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
            record.exc_info = None  # formatters use exc_text; a live traceback is not masked
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, process, pid, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            # the record's wall-clock time (float seconds), not an event time: not iso_ms
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
        }
        for key, value in extra_fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``[process/pid] logger: message key=value …`` (time and level come from rich or here)."""

    def __init__(self, *, with_time_and_level: bool) -> None:
        prefix = "%(asctime)s %(levelname)-7s " if with_time_and_level else ""
        super().__init__(prefix + "[%(processName)s/%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return text
        head, sep, tail = text.partition("\n")
        pairs = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} {pairs}{sep}{tail}"


def _parse_level(level: str) -> int:
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ConfigError(
            "LOG_LEVEL", f"unknown level {level!r} (debug, info, warning, error, critical)"
        )
    return value


def _build_handler(json_lines: bool, stream: TextIO) -> logging.Handler:
    handler: logging.Handler
    if json_lines:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(
            console=Console(file=stream),
            show_path=False,
            markup=False,
            rich_tracebacks=False,  # tracebacks go through the masked exc_text
        )
        handler.setFormatter(TextFormatter(with_time_and_level=False))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(TextFormatter(with_time_and_level=True))
    handler.addFilter(SecretFilter())
    setattr(handler, _HANDLER_MARK, True)
    return handler


def setup_logging(
    level: str, *, json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure the root logger of this process; calling it again replaces the setup.

    ``json_lines=None`` picks JSON when ``stream`` (default stderr) is not a terminal.
    Raises :class:`~segs.errors.ConfigError` naming ``LOG_LEVEL`` for an unknown level.
    """
    numeric = _parse_level(level)
    out = stream if stream is not None else sys.stderr
    use_json = (not out.isatty()) if json_lines is None else json_lines
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_build_handler(use_json, out))
    root.setLevel(numeric)
