"""Single-core micro-benchmarks of the decoder and the window engine.

    .venv/bin/python -m segs.bench.engine [--quick] [--json PATH]

* decode: msgs/s on simulator-like ~290-byte messages, validation included, with the native
  path (``segs/intake/_fastscan.c``) and the Python paths alone; the same fields at ~330 bytes; and
  the simulator's own stream (100,000 meters in random order, 1 % invalid);
* windows: readings/s of ``add`` of the 1-minute engine (the only one the worker keeps;
  at each checkpoint :func:`segs.windows.partials.roll_up` rolls its partials up into the
  15-minute ones), 100,000 meters,
  each reporting every 10 s of event time, 50,000 readings per batch;
* memory: RSS growth of the engine with 100,000 and 1,000,000 active meters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from segs.intake.decode import NATIVE, Decoder
from segs.intake.readings import Interner, Readings, meter_interner
from segs.tools.simulator import SimulatorOptions, generate
from segs.windows.engine import WindowEngine

T0 = 1_795_759_200_000  # 2026-11-27T06:00:00Z
REGIONS = ["north", "south", "east", "west", "central"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def message(i: int, ts_ms: int, rng: random.Random) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000))
    obj = {
        "readingId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "meterId": f"MTR-{i:08d}",
        "userId": f"USR-{i:08d}",
        "timestamp": f"{stamp}.{ts_ms % 1000:03d}Z",
        "powerKw": round(rng.uniform(0.2, 6.0), 3),
        "energyKwh": round(rng.uniform(0, 0.1), 4),
        "voltage": round(rng.gauss(230, 2), 1),
        "region": REGIONS[i % len(REGIONS)],
        "seq": rng.randrange(100_000),
        "status": "normal",
        "metadata": {"firmware": "v2.1.0", "signalStrength": -rng.randrange(40, 90)},
    }
    return json.dumps(obj, separators=(",", ":")).encode()


def best_rate(dec: Decoder, batches: list[list[bytes | None]], now: int, rounds: int) -> float:
    """Best messages/s of ``rounds`` passes over ``batches``, after one warm-up pass."""
    def one_pass() -> float:
        t = time.perf_counter()
        for b in batches:
            dec.decode(b, np.zeros(len(b), np.int32), np.arange(len(b), dtype=np.int64), now)
        return sum(map(len, batches)) / (time.perf_counter() - t)
    one_pass()  # interns every name
    return max(one_pass() for _ in range(rounds))


def mean_bytes(values: list[bytes | None]) -> float:
    return sum(len(v) for v in values if v) / len(values)


def bench_decode(rounds: int, batch: int) -> dict[str, float]:
    """Decode + validate: the bench messages (all valid) with the native path and with the
    Python paths alone, the same at ~330 bytes, and the simulator's own stream (100,000
    meters in random order, 1 % invalid, duplicates, late and out-of-order readings)."""
    rng = random.Random(1)
    values: list[bytes | None] = [message(i % 100_000, T0 + i * 10, rng) for i in range(batch)]
    now = T0 + batch * 10
    r, rej = Decoder(meter_interner(), Interner()).decode(
        values, np.zeros(batch, np.int32), np.arange(batch, dtype=np.int64), now)
    assert len(r) == batch and not rej
    opts = SimulatorOptions(meters=100_000, count=4 * batch, seed=1, invalid_fraction=0.01,
                            duplicate_fraction=0.01, late_fraction=0.01,
                            out_of_order_fraction=0.05)
    sim: list[bytes | None] = [m.value for chunk in generate(opts) for m in chunk]
    sim_batches = [sim[i:i + batch] for i in range(0, len(sim), batch)]
    sim_now = int(time.time() * 1000)
    # ~330 bytes, the size the issue names: the same fields written with JSON's default
    # separators (", ", ": ") and a longer firmware string
    spaced: list[bytes | None] = []
    for v in values:
        obj = json.loads(v)  # type: ignore[arg-type]
        obj["metadata"]["firmware"] += "-build.4471"
        spaced.append(json.dumps(obj).encode())
    return {
        "decode_msgs_per_s": best_rate(Decoder(meter_interner(), Interner()), [values], now,
                                       rounds),
        "decode_spaced_msgs_per_s": best_rate(Decoder(meter_interner(), Interner()), [spaced], now,
                                              rounds),
        "spaced_message_bytes": mean_bytes(spaced),
        "decode_python_msgs_per_s": best_rate(
            Decoder(Interner(), Interner(), native=False), [values], now, max(2, rounds // 4)),
        "decode_simulator_msgs_per_s": best_rate(
            Decoder(meter_interner(), Interner()), sim_batches, sim_now, max(2, rounds // 4)),
        "message_bytes": mean_bytes(values),
        "native": float(NATIVE),
    }


def stream(meters: int, batch: int, n_batches: int, every_ms: int) -> list[Readings]:
    """Batches of readings: each meter once per ``every_ms`` of event time, in time order."""
    rng = np.random.default_rng(2)
    out = []
    step = every_ms / meters
    for b in range(n_batches):
        i = np.arange(b * batch, (b + 1) * batch, dtype=np.int64)
        out.append(
            Readings(
                meter=(i % meters).astype(np.int32),
                region=(i % len(REGIONS)).astype(np.int32),
                ts_ms=T0 + (i * step).astype(np.int64),
                power=rng.random(batch) * 6,
                energy=rng.random(batch) * 0.1,
                voltage=np.full(batch, 230.0),
                partition=((i % meters) % 12).astype(np.int32),
                offset=i,
            )
        )
    return out


def engine() -> WindowEngine:
    """The one engine the worker keeps: 1-minute windows (15-minute partials are rolled up
    from its partials at each checkpoint, :func:`segs.windows.partials.roll_up`)."""
    regions = Interner()
    for name in REGIONS:
        regions.slot(name)
    return WindowEngine(60, regions=regions)


def bench_windows(meters: int, batch: int, n_batches: int) -> dict[str, float]:
    batches = stream(meters, batch, n_batches, every_ms=10_000)
    e1 = engine()
    e1.add(batches[0], T0)  # allocate
    t_add = t_drain = 0.0
    for k, r in enumerate(batches[1:], 1):
        t = time.perf_counter()
        e1.add(r, T0)
        t_add += time.perf_counter() - t
        if k % 10 == 0:  # a checkpoint every ten batches
            t = time.perf_counter()
            e1.drain()
            t_drain += time.perf_counter() - t
    n = batch * (len(batches) - 1)
    return {"window_readings_per_s": n / t_add, "checkpoint_ms": 1000 * t_drain / (n_batches // 10)}


def bench_memory(meters: int) -> dict[str, float]:
    """RSS growth of the window engine with ``meters`` active meters, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "segs.bench.engine", "--memory-child", str(meters)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def memory_child(meters: int) -> dict[str, float]:
    batches = stream(meters, 100_000, -(-meters // 100_000), every_ms=10_000)
    gc.collect()
    before = rss_bytes()
    e1 = engine()
    for r in batches:
        e1.add(r, T0)
    gc.collect()
    grown = rss_bytes() - before
    arrays = sum(a.nbytes for a in vars(e1).values() if isinstance(a, np.ndarray))
    return {f"rss_mb_{meters}": grown / 2**20, f"arrays_mb_{meters}": arrays / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip 1M meters")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    res: dict[str, Any] = {}
    res.update(bench_decode(5 if args.quick else 20, 50_000))
    res.update(bench_windows(100_000, 50_000, 21 if args.quick else 81))
    res.update(bench_memory(100_000))
    if not args.quick:
        res.update(bench_memory(1_000_000))

    table = Table(title="segs engine (single core)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("message size", f"{res['message_bytes']:.0f} B", "")
    path = "native" if res["native"] else "NOT BUILT: Python"
    table.add_row(f"decode + validate ({path})", f"{res['decode_msgs_per_s']:,.0f} msg/s",
                  "≥ 1,000,000")
    table.add_row(f"  {res['spaced_message_bytes']:.0f} B, with spaces",
                  f"{res['decode_spaced_msgs_per_s']:,.0f} msg/s", "≥ 1,000,000")
    table.add_row("  simulator stream, 1 % invalid",
                  f"{res['decode_simulator_msgs_per_s']:,.0f} msg/s", "≥ 1,000,000")
    table.add_row("  Python paths only", f"{res['decode_python_msgs_per_s']:,.0f} msg/s", "")
    table.add_row(
        "window add (1m engine)", f"{res['window_readings_per_s']:,.0f} rd/s", "≥ 8,000,000"
    )
    table.add_row("drain", f"{res['checkpoint_ms']:.1f} ms", "")
    for m in (100_000, 1_000_000):
        if f"rss_mb_{m}" in res:
            table.add_row(
                f"RSS, {m:,} meters",
                f"{res[f'rss_mb_{m}']:.0f} MB (arrays {res[f'arrays_mb_{m}']:.0f})",
                f"≤ {m // 1000} MB",
            )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
