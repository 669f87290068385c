"""A worker's state as its supervisor sees it: one int per worker in a shared array."""

from __future__ import annotations

from enum import IntEnum


class WorkerState(IntEnum):
    STARTING = 0  # the array's initial value: a spawned worker starts here
    RUNNING = 1
    DEGRADED = 2  # intake paused: a checkpoint fails and is retried with back-off
    STOPPING = 3
    STOPPED = 4

    @property
    def label(self) -> str:
        return self.name.lower()
