"""Simulator throughput: generation alone, and generation + produce to Kafka.

    .venv/bin/python -m segs.bench.simulator                      # mock cluster
    .venv/bin/python -m segs.bench.simulator --local-kafka        # real broker, started here
    .venv/bin/python -m segs.bench.simulator --brokers host:9092  # your broker

Generation is measured twice: the batches :func:`segs.tools.simulator.produce` sends (message
bytes only) and the public :func:`segs.tools.simulator.generate` (``SimMessage`` lists). The
produce figure includes the final ``flush()``; beside the wall-clock rate it gives messages
per CPU-second of the producing (Python) thread, i.e. what one core sustains when the broker
is not the bottleneck (on a small machine a local broker competes for the same cores).
librdkafka's mock cluster is slow (a few thousand messages/s), so with it the produce run is
short and its figure says little.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
import uuid
from collections.abc import Iterator

from segs.tools.harness import create_topics, delete_topics
from segs.tools.simulator import SimulatorOptions, generate, produce
from segs.tools.simulator.model import Simulation, limited


def _options(count: int, meters: int, disorder: bool) -> SimulatorOptions:
    extra = (
        {
            "duplicate_fraction": 0.01,
            "late_fraction": 0.01,
            "invalid_fraction": 0.01,
            "out_of_order_fraction": 0.01,
        }
        if disorder
        else {}
    )
    start = time.time_ns() // 1_000_000 - 86_400_000  # a day back: no holding back
    return SimulatorOptions(meters=meters, count=count, seed=1, start_ms=start, **extra)  # type: ignore[arg-type]


def bench_generation(count: int, meters: int, disorder: bool) -> tuple[float, float, float]:
    """(batches msg/s wall, batches msg per CPU-second, generate() msg/s wall)."""
    opts = _options(count, meters, disorder)
    t, cpu = time.perf_counter(), time.thread_time()
    n = sum(len(b) for b in limited(Simulation(opts), opts))
    internal = n / (time.perf_counter() - t)
    internal_cpu = n / (time.thread_time() - cpu)
    t = time.perf_counter()
    n = sum(len(b) for b in generate(opts))
    public = n / (time.perf_counter() - t)
    return internal, internal_cpu, public


def bench_produce(
    brokers: str, count: int, meters: int, disorder: bool, compression: str, partitions: int
) -> tuple[float, float, int]:
    """(wall msg/s, msg per CPU-second of the producing thread, delivery errors)."""
    topic = f"bench-sim-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(Exception):  # the mock cluster creates topics by itself
        create_topics(brokers, {topic: partitions}, timeout_s=15)
    cpu = time.thread_time()
    summary = produce(
        _options(count, meters, disorder),
        {"bootstrap.servers": brokers, "compression.type": compression},
        topic,
        progress=False,
    )
    cpu = time.thread_time() - cpu
    with contextlib.suppress(Exception):
        delete_topics(brokers, [topic], timeout_s=15)
    return summary.rate, summary.messages / cpu, summary.delivery_errors


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.brokers:
        yield args.brokers, "given broker"
    elif args.local_kafka:
        from segs.tools.local_servers import LocalKafka

        with LocalKafka() as kafka:  # started on enter, stopped and removed on exit
            yield kafka.bootstrap, "local KRaft broker"
    else:
        from confluent_kafka import Producer

        holder = Producer({"test.mock.num.brokers": 1, "log_level": 0})
        md = holder.list_topics(timeout=5)
        yield ",".join(f"{b.host}:{b.port}" for b in md.brokers.values()), "librdkafka mock"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--brokers", default=os.environ.get("SEGS_TEST_KAFKA"))
    ap.add_argument("--local-kafka", action="store_true", help="start a throwaway KRaft broker")
    ap.add_argument("--count", type=int, default=1_000_000, help="messages per run")
    ap.add_argument("--meters", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--compression", default="lz4,none", help="comma-separated codecs")
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    args = ap.parse_args()

    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
    for disorder in (False, True):
        label = "1% each of dup/late/invalid/ooo" if disorder else "clean"
        runs = [bench_generation(args.count, args.meters, disorder) for _ in range(args.repeat)]
        print(
            f"generate only  [{label:>32}]  batches {max(r[0] for r in runs):>10,.0f} msg/s wall,"
            f" {max(r[1] for r in runs):>10,.0f} msg per CPU-second;"
            f"  generate() {max(r[2] for r in runs):>10,.0f} msg/s wall"
        )
    with _cluster(args) as (brokers, what):
        count = args.count if what != "librdkafka mock" else min(args.count, 20_000)
        for compression in args.compression.split(","):
            for disorder in (False, True):
                label = "1% each of dup/late/invalid/ooo" if disorder else "clean"
                runs = [
                    bench_produce(
                        brokers, count, args.meters, disorder, compression, args.partitions
                    )
                    for _ in range(args.repeat)
                ]
                rate = max(r for r, _, _ in runs)
                per_cpu = max(c for _, c, _ in runs)
                errors = sum(e for _, _, e in runs)
                print(
                    f"generate+produce [{what}, {compression:>4}, {label:>32}]  "
                    f"{rate:>10,.0f} msg/s wall, {per_cpu:>10,.0f} msg per CPU-second of the "
                    f"producing thread  ({count:,} msgs, {errors} delivery errors)"
                )


if __name__ == "__main__":
    main()
