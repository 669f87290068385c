"""Event time as the service spells it: epoch milliseconds, "never", and the contract's ISO text."""

from __future__ import annotations

import time
from typing import Final

NEVER: Final = -(2**62)
"""No time, watermark or window index yet ("never alerted", "no window held"). It fits a
PostgreSQL ``BIGINT`` and ``t - NEVER`` stays far from int64 overflow for any real ``t``."""


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as the contract's ISO-8601 UTC text: ``2026-11-27T06:00:17.000Z``.

    ``time.gmtime`` rather than ``datetime``: the end of a window that starts in the last
    minutes of year 9999 is still written (as year 10000) instead of raising.
    """
    secs, milli = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{milli:03d}Z"
