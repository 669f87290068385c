"""One batch of simulated messages as columns (:class:`Batch`)."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segs.tools.simulator.encoding import obj_array
from segs.tools.simulator.options import SimMessage

new_message: Callable[[tuple[bytes | None, bytes, str, str | None]], SimMessage] = (
    functools.partial(tuple.__new__, SimMessage)
)  # SimMessage(*row) without the Python-level __new__ of a NamedTuple


class Batch:
    """Messages of one batch as columns. ``kinds`` and ``anomalies`` are gathered lazily
    (through ``order``, when disorder shuffled the batch): producing needs only keys and
    values, plus the per-kind ``counts``."""

    __slots__ = (
        "_anomalies",
        "_kinds",
        "_order",
        "anomaly_counts",
        "counts",
        "keys",
        "last_event_ms",
        "values",
    )

    def __init__(
        self,
        keys: list[bytes | None],
        values: list[bytes],
        kinds: list[str],
        anomalies: list[str | None],
        counts: Counter[str],
        anomaly_counts: Counter[str],
        last_event_ms: int,
        order: NDArray[np.intp] | None = None,
    ) -> None:
        self.keys = keys
        self.values = values
        self._kinds = kinds
        self._anomalies = anomalies
        self._order = order
        self.counts = counts
        self.anomaly_counts = anomaly_counts
        self.last_event_ms = last_event_ms

    def __len__(self) -> int:
        return len(self.values)

    @property
    def kinds(self) -> list[str]:
        self._settle()
        return self._kinds

    @property
    def anomalies(self) -> list[str | None]:
        self._settle()
        return self._anomalies

    def _settle(self) -> None:
        if self._order is not None:
            self._kinds = gather(self._kinds, self._order)
            self._anomalies = gather(self._anomalies, self._order)
            self._order = None

    def head(self, n: int) -> Batch:
        kinds = self.kinds[:n]
        anomalies = self.anomalies[:n]
        return Batch(
            self.keys[:n],
            self.values[:n],
            kinds,
            anomalies,
            Counter(kinds),
            Counter(a for a in anomalies if a is not None),
            self.last_event_ms,
        )

    def messages(self) -> list[SimMessage]:
        rows = zip(self.keys, self.values, self.kinds, self.anomalies, strict=True)
        return list(map(new_message, rows))


def gather(items: list[Any], order: NDArray[np.intp]) -> list[Any]:
    """``[items[j] for j in order]``, at C speed."""
    out: list[Any] = obj_array(items)[order].tolist()
    return out
