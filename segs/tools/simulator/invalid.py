"""Broken messages: each variant breaks one rule of the input contract."""

from __future__ import annotations

import json
import math
from typing import Any, Final

from segs.tools.simulator.encoding import ts_text

INVALID_VARIANTS: Final = (
    "not_json",
    "truncated",
    "empty",
    "not_object",
    "missing_field",
    "wrong_type",
    "negative_power",
    "nan_power",
    "infinite_power",
    "negative_energy",
    "no_zone_timestamp",
    "bad_timestamp",
    "far_future_timestamp",
    "non_utf8",
    "empty_meter_id",
    "long_meter_id",
)
"""Ways :func:`make_invalid` breaks a message; each breaks a rule of the input contract."""


def make_invalid(variant: str, value: bytes, ts_ms: int, *, pick: int = 0) -> bytes:
    """``value`` (a valid simulated reading at event time ``ts_ms``) broken as ``variant``
    says; ``pick`` chooses among the sub-cases of a variant."""
    if variant == "not_json":
        return b"<reading meter=%s>" % value[50:90]
    if variant == "truncated":
        return value[: len(value) // 2 + pick % 16]
    if variant == "empty":
        return b""
    if variant == "not_object":
        return (b"[%s]", b'"%s"', b"%s")[pick % 3] % (
            value if pick % 3 == 0 else value[14:50] if pick % 3 == 1 else b"42"
        )
    if variant == "non_utf8":
        return value.replace(b'"region":"', b'"region":"\xff\xfe', 1)
    obj: dict[str, Any] = json.loads(value)
    if variant == "missing_field":
        del obj[("meterId", "region", "timestamp", "powerKw")[pick % 4]]
    elif variant == "wrong_type":
        field, bad = (
            ("powerKw", str(obj["powerKw"])),
            ("timestamp", ts_ms),
            ("meterId", 12345),
            ("region", None),
            ("powerKw", True),
            ("energyKwh", "0.1"),
        )[pick % 6]
        obj[field] = bad
    elif variant == "negative_power":
        obj["powerKw"] = -max(float(obj["powerKw"]), 0.5)
    elif variant == "nan_power":
        obj["powerKw"] = math.nan
    elif variant == "infinite_power":
        obj["powerKw"] = math.inf if pick % 2 else -math.inf
    elif variant == "negative_energy":
        obj["energyKwh"] = -0.001
    elif variant == "no_zone_timestamp":
        obj["timestamp"] = obj["timestamp"].rstrip("Z")
    elif variant == "bad_timestamp":
        obj["timestamp"] = ("27/11/2026 06:00:17", "yesterday", "2026-13-45T99:00:00Z")[pick % 3]
    elif variant == "far_future_timestamp":
        # a century ahead of the reading: in the future of any clock, and deterministic
        obj["timestamp"] = ts_text(ts_ms + 86_400_000 * (36_525 + pick % 365))
    elif variant == "empty_meter_id":
        obj["meterId"] = ""
    elif variant == "long_meter_id":
        obj["meterId"] = "MTR-" + "9" * 61
    else:
        raise ValueError(f"unknown invalid variant {variant!r}")
    return json.dumps(obj, separators=(",", ":")).encode()
