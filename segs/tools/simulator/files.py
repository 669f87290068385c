"""Simulated messages as a JSON-lines file, written while producing and read back by tests."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from segs.tools.simulator.options import VALID, SimMessage


class FileWriter:
    """JSON lines: ``{"key": str|null, "value": str, "kind": str, "anomaly": str|null}``;
    a value (or key) that is not UTF-8 goes as ``"value_b64"`` (``"key_b64"``) instead."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: IO[bytes] = path.open("wb")
        self._encode = msgspec.json.Encoder().encode

    def write(
        self,
        keys: list[bytes | None],
        values: list[bytes],
        kinds: list[str],
        anomalies: list[str | None],
    ) -> None:
        encode = self._encode
        lines = []
        for key, value, kind, anomaly in zip(keys, values, kinds, anomalies, strict=True):
            row: dict[str, str | None] = {"key": None}
            if key is not None:
                try:
                    row["key"] = key.decode()
                except UnicodeDecodeError:
                    del row["key"]
                    row["key_b64"] = base64.b64encode(key).decode()
            try:
                row["value"] = value.decode()
            except UnicodeDecodeError:
                row["value_b64"] = base64.b64encode(value).decode()
            row["kind"] = kind
            row["anomaly"] = anomaly
            lines.append(encode(row))
        if lines:
            self._out.write(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        self._out.close()


def write_file(path: Path, messages: Iterable[SimMessage]) -> int:
    """Write ``messages`` as JSON lines (see :func:`read_file`); returns how many."""
    writer = FileWriter(path)
    n = 0
    try:
        chunk: list[SimMessage] = []
        for msg in messages:
            chunk.append(msg)
            if len(chunk) >= 4096:
                writer.write(*_columns(chunk))
                n += len(chunk)
                chunk = []
        writer.write(*_columns(chunk))
        n += len(chunk)
    finally:
        writer.close()
    return n


def _columns(
    msgs: list[SimMessage],
) -> tuple[list[bytes | None], list[bytes], list[str], list[str | None]]:
    return (
        [m.key for m in msgs],
        [m.value for m in msgs],
        [m.kind for m in msgs],
        [m.anomaly for m in msgs],
    )


def read_file(path: Path) -> Iterator[SimMessage]:
    """The messages of a file written by :func:`write_file` or :func:`produce`, in order."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            row = decode(line)
            if "key_b64" in row:
                key: bytes | None = base64.b64decode(row["key_b64"])
            else:
                key = None if row.get("key") is None else str(row["key"]).encode()
            if "value_b64" in row:
                value = base64.b64decode(row["value_b64"])
            else:
                value = str(row["value"]).encode()
            yield SimMessage(
                key,
                value,
                str(row.get("kind", VALID)),
                row.get("anomaly"),
            )
