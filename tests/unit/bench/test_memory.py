"""`python -m segs.bench.memory` on a tiny stream: it runs, and reports every component."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
from rich.console import Console

from segs.bench import memory

METERS = 1_000
START_MS = 1_795_759_200_000  # 2026-11-27T06:00:00Z


def test_the_stream_holds_every_reading_of_every_meter() -> None:
    out = io.BytesIO()
    memory.emit(METERS, 3, 60.0, START_MS, 1_024, out)
    got = list(memory.batches(io.BytesIO(out.getvalue())))
    assert [len(v) for v, _ in got][:-1] == [1_024] * (len(got) - 1)
    assert sum(len(v) for v, _ in got) == 3 * METERS
    parts = np.concatenate([p for _, p in got])
    assert parts.min() >= 0 and parts.max() < memory.PARTITIONS
    assert all(v.startswith(b"{\"readingId\"") for v in got[0][0][:3])


def test_both_runs_report_every_component() -> None:
    res = memory.measure(memory.parse_args(
        ["--meters", str(METERS), "--readings", "3", "--start-ms", str(START_MS)]))
    plain, traced = res["plain"], res["traced"]
    assert plain["capacities"]["meters"] == METERS
    parts = plain["components"]
    assert set(parts) == set(memory.components(memory.State.new(
        memory.load_settings(env={}, env_file=None))))
    names = (("Interner: NameArena arrays",) if "Interner: NameArena arrays" in parts else
             ("Interner: meter id str objects", "TextFields: encoded COPY fields (bytes)"))
    for name in ("WindowEngine: cell arrays", *names):
        assert parts[name] >= METERS * 8, name
    assert plain["rss_end"]["VmHWM"] >= plain["rss_end"]["VmRSS"] > 0
    assert traced["by_file"]["segs/windows/engine.py"] > 0  # numpy buffers are traced
    assert traced["numpy_by_file"]["segs/windows/engine.py"] > 0
    assert set(traced["stages_peak"]) >= {"decode", "windows.add", "detector.check",
                                          "checkpoint"}
    text = io.StringIO()
    memory.render(res, Console(file=text, width=200))
    assert "B/meter" in text.getvalue() and "queued.max.messages.kbytes" in text.getvalue()


def test_help_runs() -> None:
    res = subprocess.run([sys.executable, "-m", "segs.bench.memory", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--meters" in res.stdout
