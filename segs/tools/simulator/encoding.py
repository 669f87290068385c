"""A reading's bytes: compact JSON in the original simulator's field order
(:data:`EXAMPLE`), assembled from byte fragments looked up in tables, so that a message is
one ``bytes % tuple`` of 9 fields (:data:`TEMPLATE`)."""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

EXAMPLE: Final = (
    b'{"readingId":"3f9c2a1e-7b4d-4c2a-9e1f-5a6b7c8d9e0f","meterId":"MTR-00000001",'
    b'"userId":"USR-00000001","timestamp":"2026-11-27T06:00:17.123Z","powerKw":2.345,'
    b'"energyKwh":0.000651,"voltage":230.4,"region":"north","seq":17,"status":"normal",'
    b'"metadata":{"firmware":"2.1.3","signalStrength":-67}}'
)

FIRMWARES: Final = ("2.1.0", "2.1.3", "2.2.0", "3.0.1")
P_MAX_MILLI: Final = 25_000  # 5 × the largest base load, in W
V_MIN, V_MAX = 2200, 2400  # voltage, in 0.1 V
S_MIN, S_MAX = -100, -30  # signal strength, dBm
MULT: Final = 0x5DEECE66D  # odd: seq ↦ seq·MULT mod 2**48 is a bijection
MASK48: Final = (1 << 48) - 1
TEMPLATE: Final = b"%s%012x%s%s%s%s%s%d%s"


def obj_array(items: list[Any]) -> NDArray[np.object_]:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class Fragments:
    """The lookup tables of one run: per meter (``pre``: readingId head, ``mid``: meter and
    user ids), per millisecond, per power in W (with its energy), per voltage and region,
    per status, firmware and signal strength."""

    def __init__(
        self, ids: list[list[int]], numbers: list[int], interval_ms: int, regions: list[str]
    ) -> None:
        self.pre = obj_array(
            [
                b'{"readingId":"%04x%04x-%04x-4%03x-%x%03x-'
                % (a, b, c, d & 0xFFF, 8 + (e >> 14), e & 0xFFF)
                for a, b, c, d, e in ids
            ]
        )
        self.mid = obj_array(
            [b'","meterId":"MTR-%08d","userId":"USR-%08d","timestamp":"' % (k, k) for k in numbers]
        )
        self.ms_tab = obj_array([b'.%03dZ","powerKw":' % i for i in range(1000)])
        self.pe_tab = obj_array([power_energy(p, interval_ms) for p in range(P_MAX_MILLI + 1)])
        names = [json.dumps(n).encode() for n in regions]
        self.vr_tab = obj_array(
            [
                b'%s,"region":%s,"seq":' % (decimal(v, 1), name)
                for name in names
                for v in range(V_MIN, V_MAX + 1)
            ]
        )
        self.st_tab = obj_array(
            [
                b',"status":"%s","metadata":{"firmware":"%s","signalStrength":%d}}'
                % (status, fw.encode(), s)
                for fw in FIRMWARES
                for status in (b"normal", b"anomaly")
                for s in range(S_MIN, S_MAX + 1)
            ]
        )
        self.sec_cache: dict[int, bytes] = {}


@functools.lru_cache(maxsize=8192)
def sec_text(sec: int) -> bytes:
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()


def ts_text(ts_ms: int) -> str:
    sec, ms = divmod(ts_ms, 1000)
    return f"{sec_text(sec).decode()}.{ms:03d}Z"


def reading_id(*parts: object) -> bytes:
    """A uuid4-shaped id derived from ``parts`` (deterministic)."""
    h = bytearray(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest())
    h[6] = (h[6] & 0x0F) | 0x40
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}".encode()


def power_energy(milli: int, interval_ms: int) -> bytes:
    micro_kwh = (milli * interval_ms * 2 + 3600) // 7200  # round(kW·h·1e6), half up
    return b'%s,"energyKwh":%s,"voltage":' % (decimal(milli, 3), decimal(micro_kwh, 6))


def decimal(units: int, places: int) -> bytes:
    """``units`` × 10**-places as JavaScript prints it: ``2.34``, ``0.000651``, ``25``."""
    whole, frac = divmod(units, 10**places)
    digits = b"%0*d" % (places, frac)
    digits = digits.rstrip(b"0")
    return b"%d.%s" % (whole, digits) if digits else b"%d" % whole
