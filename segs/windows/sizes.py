"""The window sizes the service stores and publishes, each named once with everything that
follows from it: its table, its checkpoint's temporary tables, its topic and labels.

Window sizes are keyed by their length in seconds (``60``, ``900``) wherever a mapping per
size is passed around; :data:`BY_SECONDS` turns such a key back into its :class:`WindowSize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from segs.config import Settings


@dataclass(frozen=True, slots=True)
class WindowSize:
    """One stored window size."""

    seconds: int
    granularity: str  # the aggregates' "granularity" field and the metrics' label
    table: str  # its aggregate table
    partials_table: str  # the checkpoint's temporary table of partials to merge
    fresh_table: str  # … and of partials of windows never written (plain insert)
    type_header: bytes  # header "type" of its aggregate messages
    topic_setting: str  # the setting naming its output topic
    topic_field: str  # … as a field of Settings

    @property
    def ms(self) -> int:
        return self.seconds * 1000

    def topic(self, settings: Settings) -> str:
        """The Kafka topic its closed windows are published to."""
        topic: str = getattr(settings, self.topic_field)
        return topic


ONE_MINUTE: Final = WindowSize(
    60, "1m", "aggregates_1m", "segs_partials_1m", "segs_fresh_1m", b"1m_aggregate",
    "KAFKA_TOPIC_AGG_1M", "topic_agg_1m")
FIFTEEN_MINUTES: Final = WindowSize(
    900, "15m", "aggregates_15m", "segs_partials_15m", "segs_fresh_15m", b"15m_aggregate",
    "KAFKA_TOPIC_AGG_15M", "topic_agg_15m")

SIZES: Final = (ONE_MINUTE, FIFTEEN_MINUTES)
"""Finest first: the worker keeps the first in memory and rolls it up into the others."""
BY_SECONDS: Final[Mapping[int, WindowSize]] = {size.seconds: size for size in SIZES}

REGIONAL_GRANULARITY: Final = "1m_regional"
"""The label of the regional 1-minute roll-up (:mod:`segs.publish.regional`) beside them."""
