"""Kafka output messages: aggregates of closed windows and dead letters, in the contract's JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from segs.sink import ClosedRow

GRANULARITY = {60: "1m", 900: "15m"}
_TYPE_HEADER = {60: b"1m_aggregate", 900: b"15m_aggregate"}
_encode = msgspec.json.Encoder().encode


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds and ``Z``."""
    secs, milli = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{milli:03d}Z"


def encode_aggregates(
    size_s: int, rows: Sequence[ClosedRow]
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) of each closed-window row, compatible with the original service."""
    granularity = GRANULARITY[size_s]
    headers = [("type", _TYPE_HEADER[size_s])]
    size_ms = size_s * 1000
    out = []
    for meter_id, region, start_ms, avg, mx, mn, energy, count in rows:
        value = {
            "meterId": meter_id,
            "region": region,
            "windowStart": iso_ms(start_ms),
            "windowEnd": iso_ms(start_ms + size_ms),
            "avgPowerKw": avg,
            "maxPowerKw": mx,
            "minPowerKw": mn,
            "energyKwhSum": energy,
            "readingCount": count,
            "granularity": granularity,
        }
        out.append((meter_id.encode(), _encode(value), headers))
    return out


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int,
                        offset: int) -> list[tuple[str, bytes]]:
    return [
        ("segs.error", reason.encode()),
        ("segs.detail", detail.encode("utf-8", "replace")[:1024]),
        ("segs.source", f"{topic}/{partition}/{offset}".encode()),
    ]
