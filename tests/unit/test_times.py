"""The shared event-time vocabulary: "never" and the contract's ISO text."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np

from segs.times import NEVER, iso_ms


def test_iso_ms_is_utc_with_milliseconds() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1_795_759_217_123) == "2026-11-27T06:00:17.123Z"
    assert iso_ms(1_000) == "1970-01-01T00:00:01.000Z"
    assert iso_ms(999) == "1970-01-01T00:00:00.999Z"


def test_iso_ms_matches_datetime_over_the_readable_years() -> None:
    # what alerts wrote before they shared this formatter (datetime arithmetic)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    lo = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)
    hi = int(datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
    rng = random.Random(17)
    for ms in [lo, hi, *(rng.randint(lo, hi) for _ in range(20_000))]:
        dt = epoch + timedelta(milliseconds=ms)
        assert iso_ms(ms) == f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def test_iso_ms_writes_the_end_of_the_last_window() -> None:
    assert iso_ms(253_402_300_800_000) == "10000-01-01T00:00:00.000Z"


def test_never_fits_bigint_and_subtracts_safely() -> None:
    assert -(2**63) < NEVER < 0
    assert np.int64(2**62 - 1) - np.int64(NEVER) > 0  # largest sane ts minus never
