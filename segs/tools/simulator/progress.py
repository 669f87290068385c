"""Progress of a producing run on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any


class Reporter:
    """A rich progress bar on a terminal, else a plain line on stderr every few seconds."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.next_at = self.t0
        self.tty = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]simulate"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10,.0f} msg/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task("simulate", total=total, rate=0.0)
            self._progress.start()

    def update(self, sent: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now < self.next_at and not force:
            return
        rate = sent / max(now - self.t0, 1e-9)
        if self._progress is not None:
            self._progress.update(self._task, completed=sent, rate=rate)
            self.next_at = now + 0.1
        else:
            of = f" of {self.total:,}" if self.total else ""
            print(f"simulate: {sent:,}{of} messages, {rate:,.0f} msg/s", file=sys.stderr)
            self.next_at = now + 5.0

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
