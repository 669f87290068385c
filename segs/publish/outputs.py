"""Kafka output messages: aggregates of closed windows and dead letters, in the contract's JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from segs.times import iso_ms
from segs.windows.sizes import BY_SECONDS, SIZES

if TYPE_CHECKING:  # the rows' type only: publishing needs no database driver to import
    from segs.checkpoint.sink import ClosedRow

Headers = list[tuple[str, bytes]]
Message = tuple[bytes, bytes, Headers]  # key, value, headers: what the service produces

GRANULARITY = {size.seconds: size.granularity for size in SIZES}  # window size (s) → label
_encode = msgspec.json.Encoder().encode


def encode_aggregates(size_s: int, rows: Sequence[ClosedRow]) -> list[Message]:
    """(key, value, headers) of each closed-window row, compatible with the original service."""
    size = BY_SECONDS[size_s]
    granularity, size_ms = size.granularity, size.ms
    headers = [("type", size.type_header)]
    out: list[Message] = []
    for row in rows:
        value = {
            "meterId": row.meter_id,
            "region": row.region,
            "windowStart": iso_ms(row.window_start_ms),
            "windowEnd": iso_ms(row.window_start_ms + size_ms),
            "avgPowerKw": row.avg_power,
            "maxPowerKw": row.max_power,
            "minPowerKw": row.min_power,
            "energyKwhSum": row.total_energy,
            "readingCount": row.sample_count,
            "granularity": granularity,
        }
        out.append((row.meter_id.encode(), _encode(value), headers))
    return out


# Room left in a record for Kafka's own framing (record batch and record headers, varints).
_RECORD_OVERHEAD = 512
_KEY_KEPT = 1024  # bytes of an oversize key kept in a cut dead letter


def fit_dead_letter(key: bytes | None, value: bytes | None, headers: Headers,
                    limit: int) -> tuple[bytes | None, bytes | None, Headers]:
    """The dead letter itself, or, when it would exceed ``limit`` bytes, cut to fit.

    A cut keeps the first 1,024 bytes of the key and as much of the value as fits, and adds
    the header ``segs.truncated`` = ``key=<bytes>,value=<bytes>`` with the original sizes;
    ``segs.source`` still points at the whole message in the input topic. Cutting an already
    cut letter keeps its first sizes, so a letter is never larger than the first cut.
    """
    k, v = key or b"", value or b""
    budget = limit - _RECORD_OVERHEAD - sum(len(n) + len(b) for n, b in headers) - 64
    if len(k) + len(v) <= budget:
        return key, value, headers
    known = dict(headers).get("segs.truncated")
    sizes = known or f"key={len(k) if key is not None else -1},value={len(v)}".encode()
    k = k[:min(_KEY_KEPT, max(0, budget))]
    v = v[:max(0, budget - len(k))]
    kept = [(n, b) for n, b in headers if n != "segs.truncated"]
    return (k if key is not None else None, v if value is not None else None,
            [*kept, ("segs.truncated", sizes)])


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int,
                        offset: int) -> Headers:
    return [
        ("segs.error", reason.encode()),
        ("segs.detail", detail.encode("utf-8", "replace")[:1024]),
        ("segs.source", f"{topic}/{partition}/{offset}".encode()),
    ]
