"""What to simulate (:class:`SimulatorOptions`, checked on creation) and what comes out: the
kinds of message, :class:`SimMessage`, :class:`SimulatorSummary`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from segs.errors import ConfigError

VALID: Final = "valid"
OUT_OF_ORDER: Final = "out_of_order"
DUPLICATE: Final = "duplicate"
LATE: Final = "late"
INVALID: Final = "invalid"
KINDS: Final = (VALID, OUT_OF_ORDER, DUPLICATE, LATE, INVALID)
"""Kinds of :class:`SimMessage`; ``valid`` and ``out_of_order`` are the fresh readings."""

ANOMALY_KINDS: Final = ("spike", "drop", "outage")

_BASE_NAMES: Final = ("north", "south", "east", "west", "central")
MAX_METERS: Final = 10_000_000
MAX_FUTURE_START_MS: Final = 240_000  # an explicit start_ms may be this far ahead of now


def region_names(n: int) -> list[str]:
    """``north, south, east, west, central``, then ``region-6``, ``region-7`` …"""
    return [_BASE_NAMES[i] if i < len(_BASE_NAMES) else f"region-{i + 1}" for i in range(n)]


class SimMessage(NamedTuple):
    """One simulated Kafka message and what it is meant to be."""

    key: bytes | None
    value: bytes
    kind: str  # one of KINDS
    anomaly: str | None  # one of ANOMALY_KINDS for an injected anomaly, else None


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """What to simulate. Fractions of ``duplicate``/``late``/``invalid``/``out_of_order`` are
    shares of all messages; ``anomaly_fraction`` is the share of fresh readings (capped by the
    one-per-600-s-per-meter spacing). ``count`` and ``duration_s`` (wall clock) both stop the
    run, whichever comes first; with neither it runs until stopped."""

    meters: int = 1000
    regions: int = 5
    count: int | None = None
    duration_s: float | None = None
    rate: float = 0.0
    interval_s: float = 1.0
    start_ms: int | None = None
    seed: int = 0
    anomaly_fraction: float = 0.001
    duplicate_fraction: float = 0.0
    out_of_order_fraction: float = 0.0
    late_fraction: float = 0.0
    invalid_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_int("meters", self.meters, 1, MAX_METERS)
        check_int("regions", self.regions, 1, 10_000)
        if self.count is not None:
            check_int("count", self.count, 1, 2**62)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.duration_s is not None:
            check_float("duration_s", self.duration_s, 0.0, 10 * 365 * 86400.0, open_low=True)
        check_float("rate", self.rate, 0.0, 1e9)
        check_float("interval_s", self.interval_s, 0.001, 86400.0)
        fractions = (
            "anomaly_fraction",
            "duplicate_fraction",
            "out_of_order_fraction",
            "late_fraction",
            "invalid_fraction",
        )
        for name in fractions:
            check_float(name, getattr(self, name), 0.0, 1.0)
        extra = self.duplicate_fraction + self.late_fraction + self.invalid_fraction
        if 2 * extra + self.out_of_order_fraction > 1.0:
            raise ConfigError(
                "fractions",
                "too much disorder: 2 × (duplicate + late + invalid) + out-of-order must be "
                f"≤ 1, got {2 * extra + self.out_of_order_fraction:.3g}",
            )
        if self.start_ms is not None:
            check_int("start_ms", self.start_ms, 946_684_800_000, 2**53)
            ahead = self.start_ms - wall_clock_ms()
            if ahead > MAX_FUTURE_START_MS:
                raise ConfigError(
                    "start_ms",
                    f"is {ahead / 60000:.1f} min in the future; at most "
                    f"{MAX_FUTURE_START_MS // 60000} min is allowed (event times must stay "
                    "within 5 min of the wall clock)",
                )

    @property
    def interval_ms(self) -> int:
        return max(1, round(self.interval_s * 1000))

    def planned_messages(self) -> int | None:
        """How many messages the run will produce, when that is known in advance."""
        if self.count is not None:
            if self.duration_s is not None and self.rate > 0:
                return min(self.count, math.ceil(self.duration_s * self.rate))
            return self.count
        if self.duration_s is not None and self.rate > 0:
            return math.ceil(self.duration_s * self.rate)
        return None


def check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, f"must be an integer from {low:,} to {high:,}, got {value!r}")


def check_float(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and float(value) <= high  # type: ignore[arg-type]
    ok = ok and (float(value) > low if open_low else float(value) >= low)  # type: ignore[arg-type]
    if not ok:
        bound = f"more than {low:g}" if open_low else f"from {low:g}"
        raise ConfigError(name, f"must be a number {bound} to {high:g}, got {value!r}")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class SimulatorSummary:
    """What a :func:`produce` run did."""

    messages: int
    kinds: dict[str, int]
    anomalies: dict[str, int]
    bytes: int
    elapsed_s: float
    rate: float  # messages/s achieved, flush included
    delivery_errors: int
    last_error: str | None
    interrupted: bool
    start_ms: int  # event time of the first round
    last_event_ms: int | None  # event time of the last fresh reading
    topic: str | None
    file: Path | None
