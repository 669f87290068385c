"""Where a worker's bytes go: its per-meter state for N distinct meters (issue 20).

    .venv/bin/python -m segs.bench.memory --meters 100000 [--readings 6] [--json PATH]

The stream is the simulator's (one reading per meter per ``--interval-s`` of event time),
decoded and applied as :class:`segs.runtime.worker.Worker` does it: ``Decoder`` →
``MeterPartitions.note`` → ``WindowEngine.add`` → ``AnomalyDetector.check`` in batches of
``BATCH_SIZE``, and a checkpoint cut every ``FLUSH_INTERVAL_1M`` of event time
(:meth:`Worker.encodings`, :meth:`Worker.drain`: ``TextFields``, the drained partials,
``WrittenWindows.fresh``, the split into ``CHECKPOINT_WRITERS`` payloads, each encoded as the
sink's binary COPY data). Nothing is sent to Kafka or PostgreSQL.

Three processes: the simulator makes the messages in one and sends them through a pipe, so
its own per-meter tables are counted nowhere. The same stream is then measured twice, each
time in a fresh process: untraced, for VmRSS / VmHWM and the size of each component's
objects (numpy ``nbytes``, ``sys.getsizeof``); and under :mod:`tracemalloc`, which also sees
numpy's buffers (numpy reports them in its own tracemalloc domain), for the bytes kept at
the end by the source file that allocated them and each stage's transient peak.
tracemalloc's own bookkeeping would inflate RSS, hence the two runs. Per-partition state
(``PartitionBook``, watermarks), alerts and the Kafka clients are left out: they do not
grow with meters.

librdkafka's queues are not measured here: :func:`librdkafka_bounds` states their bounds as
:mod:`segs.runtime.kafka_clients` configures them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.console import Console
from rich.table import Table

import segs
from segs.checkpoint.payload import MeterPartitions, Payload, WrittenWindows
from segs.checkpoint.pgcopy import CopyData, TextFields
from segs.config import Settings, load_settings
from segs.detection.detector import AnomalyDetector, DetectorSettings
from segs.intake import readings as readings_module
from segs.intake.decode import Decoder
from segs.intake.readings import CompactInterner, Interner, meter_interner
from segs.runtime.kafka_clients import PREFETCH, producer_config
from segs.tools import procfs
from segs.tools.simulator import SimulatorOptions, generate
from segs.windows.engine import WindowEngine
from segs.windows.partials import region_ranks
from segs.windows.sizes import ONE_MINUTE

PARTITIONS = 6  # as the benchmark's topic
NUMPY_DOMAIN = 389047  # numpy's tracemalloc domain (numpy/core/src/multiarray/alloc.c)
_FRAME = struct.Struct("<II")  # messages in the batch, bytes of their values
_ROOT = str(Path(segs.__file__).resolve().parent)


# ---------------------------------------------------------------------------- the stream

def emit(meters: int, readings: int, interval_s: float, start_ms: int, batch: int,
         out: IO[bytes]) -> None:
    """Write the simulator's messages to ``out`` in batches of ``batch``: a frame header,
    then the partitions and value lengths (int32), then the values. The partition is the
    key's CRC32, as librdkafka's default partitioner picks it."""
    opts = SimulatorOptions(meters=meters, count=meters * readings, interval_s=interval_s,
                            start_ms=start_ms)
    parts: list[int] = []
    values: list[bytes] = []

    def flush() -> None:
        blob = b"".join(values)
        out.write(_FRAME.pack(len(values), len(blob)))
        out.write(np.array(parts, np.int32).tobytes())
        out.write(np.fromiter(map(len, values), np.int32, len(values)).tobytes())
        out.write(blob)
        parts.clear()
        values.clear()

    for msgs in generate(opts):
        for m in msgs:
            parts.append(zlib.crc32(m.key or b"") % PARTITIONS)
            values.append(m.value)
            if len(values) == batch:
                flush()
    if values:
        flush()
    out.flush()


def batches(src: IO[bytes]) -> Iterator[tuple[list[bytes], np.ndarray[Any, Any]]]:
    """The batches :func:`emit` wrote: values as separate ``bytes``, as ``Message.value()``
    gives them, and their partitions."""
    while header := src.read(_FRAME.size):
        n, size = _FRAME.unpack(header)
        parts = np.frombuffer(src.read(4 * n), np.int32)
        lengths = np.frombuffer(src.read(4 * n), np.int32)
        blob = src.read(size)
        ends = np.cumsum(lengths).tolist()
        starts = [0, *ends[:-1]]
        yield [blob[a:b] for a, b in zip(starts, ends, strict=True)], parts


# ---------------------------------------------------------------------------- the worker's state

@dataclass(slots=True)
class State:
    """The per-meter state of one worker, built as :class:`segs.runtime.worker.Worker` builds it."""

    meters: Interner
    regions: Interner
    meter_fields: TextFields
    region_fields: TextFields
    decoder: Decoder
    windows: WindowEngine
    detector: AnomalyDetector
    written: WrittenWindows
    meter_partitions: MeterPartitions

    @classmethod
    def new(cls, s: Settings) -> State:
        meters, regions = meter_interner(), Interner()
        return cls(
            meters, regions, TextFields.of(meters), TextFields(regions.names),
            Decoder(meters, regions, max_message_bytes=s.max_message_bytes,
                    max_future_skew_ms=s.max_future_skew_ms),
            WindowEngine(ONE_MINUTE.seconds, regions=regions,
                         allowed_lateness_ms=s.allowed_lateness_ms,
                         idle_advance_ms=s.idle_advance_ms, deduplicate=s.deduplicate),
            AnomalyDetector(DetectorSettings(
                spike_threshold=s.spike_threshold, drop_threshold=s.drop_threshold,
                min_samples=s.min_samples, cooldown_ms=s.alert_cooldown_ms)),
            WrittenWindows(), MeterPartitions())


Step = Callable[..., Any]  # (stage name, function, *args) → function(*args)


def run_step(name: str, work: Callable[..., Any], *args: Any) -> Any:
    """The untraced :data:`Step`: just the work."""
    return work(*args)


def drive(state: State, src: IO[bytes], s: Settings, step: Step, *, chunks: int | None) -> int:
    """Apply the stream as the worker does; ``step`` runs each stage, ``chunks`` as in
    :func:`checkpoint`. Returns the largest checkpoint payload seen (numpy bytes: partials,
    baselines, fresh flags)."""
    largest = 0
    next_cut: int | None = None
    for values, parts in batches(src):
        now_ms = time.time_ns() // 1_000_000
        offsets = np.arange(len(values), dtype=np.int64)
        r, _ = step("decode", state.decoder.decode, values, parts, offsets, now_ms)
        if s.checkpoint_writers > 1:
            step("meter partitions", state.meter_partitions.note, r.meter, r.partition)
        step("windows.add", state.windows.add, r, now_ms)
        step("detector.check", state.detector.check, r)
        newest = int(r.ts_ms.max())
        next_cut = newest + s.checkpoint_interval_ms if next_cut is None else next_cut
        if newest >= next_cut:
            largest = max(largest, step("checkpoint", checkpoint, state, s, chunks))
            next_cut += s.checkpoint_interval_ms
    last: int = step("checkpoint", checkpoint, state, s, chunks)
    return max(largest, last)


def checkpoint(state: State, s: Settings, chunks: int | None = None) -> int:
    """One cut and the encoding of its COPY data, chunk by chunk as the sink sends it
    (nothing is sent), only its first ``chunks`` pieces of each table if given: memory is
    the same for every chunk, and under tracemalloc encoding all of them takes minutes.
    Returns the payload's numpy bytes."""
    names, regions = state.meter_fields.fields(), state.region_fields.fields()
    rank = region_ranks(state.regions)
    state.windows.advance_idle(time.time_ns() // 1_000_000)
    partials = state.windows.drain()
    payload = Payload(partials, state.detector.take_dirty(), {},
                      state.written.fresh(partials))
    del partials
    if s.deduplicate:  # as the worker: identities stored with the partials, readings undecided
        payload.identities = state.windows.take_identities()
        payload.undecided = state.windows.take_undecided()
    held = _nbytes(payload.partials) + _nbytes(payload.baselines) + sum(
        a.nbytes for a in payload.fresh.values())
    if payload.identities is not None and payload.undecided is not None:
        u = payload.undecided
        held += payload.identities.nbytes() + sum(
            getattr(u, f).nbytes for f in u.__dataclass_fields__)
    parts = payload.split(s.checkpoint_writers, consume=True)
    del payload  # as in Worker.drain: only the parts are kept
    jobs = [part.commit_job(names, regions, rank) for part in parts]  # as commit_all
    for job in jobs:
        copies = [*job.partials.values(), *job.fresh.values(), job.baselines]
        for copy in copies:
            assert isinstance(copy, CopyData)
            pieces = iter(copy.chunks)
            for _ in islice(pieces, chunks):
                pass
            if isinstance(pieces, Generator):
                pieces.close()  # its chunk is freed now, as after the last one
    return held


def _nbytes(columns: object) -> int:
    fields = getattr(type(columns), "__slots__", ())
    return sum(v.nbytes for f in fields if isinstance(v := getattr(columns, f, None), np.ndarray))


# ---------------------------------------------------------------------------- what it holds

def components(state: State) -> dict[str, int]:
    """Bytes of each component's objects: numpy ``nbytes``, ``sys.getsizeof`` of Python
    objects (their own size, without the allocator's rounding)."""
    m = state.meters
    w = state.windows
    over = sum(_nbytes(p) for p in w._over) + sum(
        a.nbytes for u in w._over_open for a in u)
    cells = sum(a.nbytes for a in vars(w).values() if isinstance(a, np.ndarray))
    names: dict[str, int] = {"Interner: NameArena arrays": m.nbytes()} if isinstance(
        m, CompactInterner) else {
        "Interner: dict meter id → slot": sys.getsizeof(m.slots),
        "Interner: slot int objects": sum(sys.getsizeof(v) for v in m.slots.values() if v > 256),
        "Interner: meter id str objects": sum(map(sys.getsizeof, m.names)),
        "Interner: list of names": sys.getsizeof(m.names),
        "TextFields: encoded COPY fields (bytes)": sum(
            map(sys.getsizeof, state.meter_fields._fields)),
        "TextFields: list of fields": sys.getsizeof(state.meter_fields._fields)}
    return names | {
        "WindowEngine: cell arrays": cells,
        "WindowEngine: overflow (_over, _over_open)": over,
        "WindowEngine: identity slab, per-cell arrays": w._ids.nbytes()[1],
        "WindowEngine: identity slab, arena": w._ids.nbytes()[0],
        "AnomalyDetector: per-slot arrays": _nbytes(state.detector),
        "WrittenWindows: per-slot arrays": sum(a.nbytes for a in state.written._latest.values()),
        "MeterPartitions: per-slot array": state.meter_partitions._home.nbytes,
    }


def capacities(state: State) -> dict[str, int]:
    """Slots each per-slot structure has room for (it grows by doubling)."""
    return {
        "meters": len(state.meters),
        "WindowEngine": state.windows._capacity,
        "WindowEngine ring": state.windows.ring,
        "AnomalyDetector": int(state.detector._samples.shape[0]),
        "WrittenWindows": int(next(iter(state.written._latest.values())).shape[0]),
        "MeterPartitions": int(state.meter_partitions._home.shape[0]),
        "overflow entries": sum(len(u.meter) for u in state.windows._over_open),
    }


def librdkafka_bounds(s: Settings) -> dict[str, int]:
    """The configured bounds of librdkafka's queues (not measured)."""
    prod = producer_config(s, max_message_bytes=s.max_message_bytes, on_delivery=lambda e, m: None)
    produced = prod["queue.buffering.max.messages"]
    assert isinstance(produced, int)
    return {
        "consumer queued.max.messages.kbytes": int(PREFETCH["queued.max.messages.kbytes"]),
        "consumer queued.min.messages (per partition)": int(PREFETCH["queued.min.messages"]),
        "consumer max.partition.fetch.bytes": int(PREFETCH["max.partition.fetch.bytes"]),
        "consumer fetch.max.bytes": int(PREFETCH["fetch.max.bytes"]),
        "producer queue.buffering.max.messages": produced,
    }


# ---------------------------------------------------------------------------- the two runs

def _rss() -> dict[str, int]:
    pid = os.getpid()
    return {"VmRSS": procfs.status_kb(pid, "VmRSS") * 1024,
            "VmHWM": procfs.status_kb(pid, "VmHWM") * 1024}


def _open_stream(args: argparse.Namespace, batch: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "segs.bench.memory", "--emit", "--meters", str(args.meters),
           "--readings", str(args.readings), "--interval-s", str(args.interval_s),
           "--start-ms", str(args.start_ms), "--batch", str(batch)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE)


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    s = load_settings(env={}, env_file=None)
    state = State.new(s)
    gc.collect()
    start = _rss()
    with _open_stream(args, s.batch_size) as proc:
        assert proc.stdout is not None
        largest = drive(state, proc.stdout, s, run_step, chunks=None)
    gc.collect()
    end = _rss()
    ctypes.CDLL(None).malloc_trim(0)  # glibc: hand free heap pages back to the kernel
    return {"rss_start": start, "rss_end": end, "rss_trimmed": _rss(),
            "components": components(state),
            "capacities": capacities(state), "payload_bytes": largest,
            "kafka": librdkafka_bounds(s), "settings": {
                "batch_size": s.batch_size, "checkpoint_writers": s.checkpoint_writers,
                "checkpoint_interval_ms": s.checkpoint_interval_ms}}


def run_traced(args: argparse.Namespace) -> dict[str, Any]:
    s = load_settings(env={}, env_file=None)
    tracemalloc.start(args.frames)
    state = State.new(s)
    gc.collect()
    before = _by_owner(tracemalloc.take_snapshot())
    peak: dict[str, int] = {}

    def step(name: str, work: Callable[..., Any], *args: Any) -> Any:
        now = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = work(*args)
        peak[name] = max(peak.get(name, 0), tracemalloc.get_traced_memory()[1] - now)
        return out

    with _open_stream(args, s.batch_size) as proc:
        assert proc.stdout is not None
        drive(state, proc.stdout, s, step, chunks=2)  # the header and one chunk
    gc.collect()
    after = _by_owner(tracemalloc.take_snapshot())
    tracemalloc.stop()
    zero = (0, 0)
    files = after.keys() | before.keys()
    return {"stages_peak": peak,
            "by_file": {f: after.get(f, zero)[0] - before.get(f, zero)[0] for f in files},
            "numpy_by_file": {f: after.get(f, zero)[1] - before.get(f, zero)[1] for f in files},
            "alive": len(state.meters)}


_HELPERS: list[Callable[..., Any]] = [readings_module.grown, readings_module.take_rows]


def _helper_lines() -> list[tuple[str, range]]:
    out = []
    for f in _HELPERS:
        lines, first = inspect.getsourcelines(f)
        out.append((inspect.getsourcefile(f) or "", range(first, first + len(lines))))
    return out


def _by_owner(snap: tracemalloc.Snapshot) -> dict[str, tuple[int, int]]:
    """Traced bytes (all, numpy's) by the innermost ``segs`` file that allocated them,
    skipping the shared array helpers of :mod:`segs.intake.readings` and this module."""
    helpers = _helper_lines()
    me = str(Path(__file__).resolve())

    def owner(tb: tracemalloc.Traceback) -> str:
        for frame in reversed(tb):  # most recent first
            f = frame.filename
            if not f.startswith(_ROOT) or f == me:
                continue
            if any(f == hf and frame.lineno in lines for hf, lines in helpers):
                continue
            return "segs" + f[len(_ROOT):]
        return "(outside segs)"

    numpy_only = snap.filter_traces([tracemalloc.DomainFilter(True, NUMPY_DOMAIN)])
    out: dict[str, tuple[int, int]] = {}
    for which, part in enumerate((snap, numpy_only)):
        for stat in part.statistics("traceback"):  # one per distinct traceback
            key = owner(stat.traceback)
            sizes = list(out.get(key, (0, 0)))
            sizes[which] += stat.size
            out[key] = (sizes[0], sizes[1])
    return out


# ---------------------------------------------------------------------------- report

def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs, each in a fresh process; their figures."""
    out: dict[str, Any] = {"meters": args.meters, "readings": args.readings,
                           "interval_s": args.interval_s}
    modes = ["plain"] + ([] if args.no_trace else ["traced"])
    for mode in modes:
        cmd = [sys.executable, "-m", "segs.bench.memory", "--child", mode,
               "--meters", str(args.meters), "--readings", str(args.readings),
               "--interval-s", str(args.interval_s), "--start-ms", str(args.start_ms),
               "--frames", str(args.frames)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[mode] = json.loads(res.stdout)
    return out


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def render(res: dict[str, Any], console: Console) -> None:
    n = res["meters"]
    plain = res["plain"]
    t = Table(title=f"worker state, {n:,} meters × {res['readings']} readings "
                    f"(sizes of the objects held, untraced run)")
    t.add_column("component")
    t.add_column("MB", justify="right")
    t.add_column("B/meter", justify="right")
    total = 0
    for name, b in sorted(plain["components"].items(), key=lambda kv: -kv[1]):
        total += b
        t.add_row(name, _mb(b), f"{b / n:,.0f}")
    t.add_row("[b]sum[/b]", _mb(total), f"{total / n:,.0f}")
    t.add_row("checkpoint payload, largest (transient)", _mb(plain["payload_bytes"]),
              f"{plain['payload_bytes'] / n:,.0f}")
    s, e = plain["rss_start"], plain["rss_end"]
    t.add_row("VmRSS growth (end − after imports)", _mb(e["VmRSS"] - s["VmRSS"]),
              f"{(e['VmRSS'] - s['VmRSS']) / n:,.0f}")
    trimmed = plain["rss_trimmed"]["VmRSS"] - s["VmRSS"]
    t.add_row("VmRSS growth after malloc_trim(0)", _mb(trimmed), f"{trimmed / n:,.0f}")
    t.add_row("VmHWM growth (peak − after imports)", _mb(e["VmHWM"] - s["VmRSS"]),
              f"{(e['VmHWM'] - s['VmRSS']) / n:,.0f}")
    console.print(t)
    console.print(f"VmRSS after imports {_mb(s['VmRSS'])} MB, at the end {_mb(e['VmRSS'])} MB, "
                  f"VmHWM {_mb(e['VmHWM'])} MB; capacities {plain['capacities']}")
    if "traced" in res:
        tr = res["traced"]
        ft = Table(title="tracemalloc: bytes kept at the end, by the segs file that "
                         "allocated them (numpy buffers included)")
        ft.add_column("file")
        ft.add_column("MB", justify="right")
        ft.add_column("B/meter", justify="right")
        ft.add_column("of which numpy MB", justify="right")
        for name, b in sorted(tr["by_file"].items(), key=lambda kv: -kv[1]):
            if abs(b) >= 1024:
                ft.add_row(name, _mb(b), f"{b / n:,.0f}", _mb(tr["numpy_by_file"].get(name, 0)))
        ft.add_row("[b]sum[/b]", _mb(sum(tr["by_file"].values())),
                   f"{sum(tr['by_file'].values()) / n:,.0f}",
                   _mb(sum(tr["numpy_by_file"].values())))
        console.print(ft)
        st = Table(title="tracemalloc by stage: largest transient peak of one call, above "
                         "what was held when it started")
        st.add_column("stage")
        st.add_column("peak MB", justify="right")
        st.add_column("B/meter", justify="right")
        for name, b in tr["stages_peak"].items():
            st.add_row(name, _mb(b), f"{b / n:,.0f}")
        console.print(st)
    k = plain["kafka"]
    console.print("librdkafka (configured bounds, not measured): " + ", ".join(
        f"{name} {v:,}" for name, v in k.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meters", type=int, default=100_000, help="distinct meter ids")
    ap.add_argument("--readings", type=int, default=6, help="readings per meter")
    ap.add_argument("--interval-s", type=float, default=60.0,
                    help="event time between a meter's readings (60: one per 1-minute window)")
    ap.add_argument("--frames", type=int, default=6, help="tracemalloc frames kept per trace")
    ap.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--start-ms", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["plain", "traced"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.start_ms is None:  # the last reading a minute before now, on a minute boundary
        now = time.time_ns() // 1_000_000
        span = round(args.readings * args.interval_s * 1000)
        args.start_ms = (now - span) // 60_000 * 60_000 - 60_000
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.emit:
        emit(args.meters, args.readings, args.interval_s, args.start_ms, args.batch,
             sys.stdout.buffer)
        return
    if args.child:
        run = run_plain if args.child == "plain" else run_traced
        print(json.dumps(run(args)))
        return
    res = measure(args)
    render(res, Console())
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
