"""Throughput of :meth:`segs.detection.detector.AnomalyDetector.check` (readings per second).

Run: ``.venv/bin/python -m segs.bench.anomaly [--meters 100000] [--repeat 20]``

Scenarios (all on warmed-up state, every meter past ``min_samples``):
- typical: batches of 10k / 25k / 50k readings over 100k meters drawn uniformly
  (each meter 0-2 times per batch, a few up to ~6);
- skewed: 50k readings where 1 % of the meters send half of them;
- worst case: one meter with 100k readings in one batch (the scalar path);
- cold: the first batch of fresh meters (all seeds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from segs.detection.detector import AnomalyDetector, DetectorSettings
from segs.intake.readings import Readings


def make_batch(rng: np.random.Generator, meter: np.ndarray, t0: int) -> Readings:
    n = int(meter.shape[0])
    power = rng.lognormal(0.6, 0.3, n)
    power[rng.random(n) < 0.002] *= 5.0  # spikes
    power[rng.random(n) < 0.001] = 0.0  # outages
    return Readings(
        meter=meter.astype(np.int32),
        region=(meter % 16).astype(np.int32),
        ts_ms=t0 + np.sort(rng.integers(0, 10_000, n)).astype(np.int64),
        power=power,
        energy=power / 60.0,
        voltage=np.full(n, 230.0),
        partition=(meter % 12).astype(np.int32),
        offset=np.arange(n, dtype=np.int64),
    )


def warm(det: AnomalyDetector, rng: np.random.Generator, meters: int) -> None:
    for k in range(12):  # every meter seeded and past min_samples = 10
        det.check(make_batch(rng, rng.permutation(meters), k * 10_000))
    det.take_dirty()


def measure(fn: Callable[[], object], repeat: int) -> float:
    """Best-of-``repeat`` seconds of one call."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--meters", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    det = AnomalyDetector(DetectorSettings(), capacity=args.meters)
    warm(det, rng, args.meters)
    t0 = 1_000_000

    rows: list[tuple[str, int, float, int]] = []

    def run(name: str, batches: list[Readings]) -> None:
        it = iter(batches * (args.repeat // len(batches) + 1))
        alerts = 0

        def one() -> None:
            nonlocal alerts
            alerts += len(det.check(next(it)))

        sec = measure(one, args.repeat)
        rows.append((name, len(batches[0]), sec, alerts))

    for n in (10_000, 25_000, 50_000):
        batches = [
            make_batch(rng, rng.integers(0, args.meters, n), t0 + 10_000 * k) for k in range(4)
        ]
        counts = np.bincount(batches[0].meter)
        run(f"typical (max {int(counts.max())}/meter)", batches)

    hot = rng.integers(0, args.meters, args.meters // 100)
    skew = np.concatenate([rng.integers(0, args.meters, 25_000), rng.choice(hot, 25_000)])
    run("skewed (1% meters = half)", [make_batch(rng, rng.permutation(skew), t0)])

    one_meter = make_batch(rng, np.full(100_000, 7), t0)
    run("worst: 1 meter x 100k", [one_meter])

    fresh = make_batch(rng, rng.integers(0, args.meters, 50_000), t0)
    sec = measure(lambda: AnomalyDetector(DetectorSettings()).check(fresh), args.repeat)
    rows.append(("cold: fresh detector, all seeds", 50_000, sec, 0))

    state_sec = measure(det.take_dirty, 1)
    print(f"{'scenario':34} {'batch':>7} {'ms/batch':>9} {'readings/s':>12}")
    for name, n, sec, _ in rows:
        print(f"{name:34} {n:7d} {sec * 1e3:9.2f} {n / sec:12,.0f}")
    print(f"take_dirty after the runs: {state_sec * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
