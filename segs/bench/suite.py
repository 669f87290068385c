"""The benchmark suite: sizes per mode, scenarios in order, a table as it goes, one result.

Order: servers up → pre-load the main topic → ceiling → pipeline (1, 2 workers) → scaling →
scaling_dense → latency (at half the 2-worker rate) → checkpoint → peer. A scenario that
fails is recorded with its error and the suite goes on; the caller turns any error into a
non-zero exit.
"""

from __future__ import annotations

import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from segs.bench import ceiling, infra
from segs.bench.checkpoint import run_checkpoint, run_checkpoint_dedup
from segs.bench.latency import run_latency
from segs.bench.peer import PeerUnavailable, run_peer
from segs.bench.pipeline import run_pipeline
from segs.intake.decode import NATIVE
from segs.tools.harness import end_offsets
from segs.tools.simulator import SimulatorOptions

SCENARIOS = ("ceiling", "pipeline", "scaling", "scaling_dense", "latency", "checkpoint", "peer")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    mode: str
    meters: int
    readings: int
    scaling_meters: tuple[int, ...]
    scaling_readings: int
    latency_meters: int
    latency_duration_s: float
    latency_speedup: float
    latency_flush_ms: int
    checkpoint_sizes: tuple[int, ...]
    peer_instances: tuple[int, ...]
    peer_target: int
    # (meters, readings) of one more scaling point with many readings per meter (issue 20):
    # the points above have 3 per meter at 1,000,000, mostly checkpoints of 1-reading partials
    scaling_dense: tuple[int, int] | None = None
    workers: tuple[int, ...] = (1, 2)
    latency_fractions: tuple[float, ...] = (0.5,)
    # the pipeline with the most workers, and the largest scaling size, run a second time
    # with REGIONAL_AGGREGATES=off: what regional aggregates cost (issue 18)
    regional_compare: bool = True
    # the pipeline with the most workers run again with DEDUPLICATE=off, and the checkpoint
    # sizes up to 100,000 partials with identities and without, alternating (issue 21)
    dedup_compare: bool = False


FULL = Plan("full", meters=100_000, readings=10_000_000,
            scaling_meters=(10_000, 100_000, 1_000_000), scaling_readings=3_000_000,
            latency_meters=100_000, latency_duration_s=75, latency_speedup=1.0,
            latency_flush_ms=5000, checkpoint_sizes=(1_000, 50_000, 100_000, 1_000_000),
            peer_instances=(1, 2), peer_target=1_000_000, latency_fractions=(0.5, 0.25),
            scaling_dense=(1_000_000, 10_000_000))
QUICK = Plan("quick", meters=2_000, readings=200_000, scaling_meters=(1_000,),
             scaling_readings=100_000, latency_meters=2_000, latency_duration_s=8,
             latency_speedup=5.0, latency_flush_ms=1000, checkpoint_sizes=(1_000, 10_000),
             peer_instances=(1,), peer_target=100_000, scaling_dense=(1_000, 10_000))


@dataclass
class Progress:
    """The table printed as the suite goes (one row per figure)."""

    console: Console
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, scenario: str, case: str, figure: str, note: str = "") -> None:
        self.rows.append((scenario, case, figure, note))
        self.console.print(f"[bold]{scenario:<11}[/] {case:<30} [cyan]{figure:>22}[/]  {note}")

    def table(self) -> Table:
        t = Table(title="segs-stream bench")
        for name in ("scenario", "case", "figure", "note"):
            t.add_column(name, justify="right" if name == "figure" else "left")
        for row in self.rows:
            t.add_row(*row)
        return t


def _rate(x: float) -> str:
    return f"{x:,.0f} readings/s"


class Suite:
    def __init__(self, plan: Plan, scenarios: tuple[str, ...], console: Console) -> None:
        self.plan = plan
        self.scenarios = scenarios
        self.progress = Progress(console)
        self.console = console
        self.workdir = Path(tempfile.mkdtemp(prefix="segs-bench-"))
        self.result: dict[str, Any] = {"scenarios": {}, "errors": {}}

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.result.update(_machine(), git=_git(), mode=self.plan.mode, plan=asdict(self.plan),
                           started=datetime.now(UTC).isoformat(timespec="seconds"),
                           load_average_start=list(infra.load_average()))
        with infra.servers() as srv:
            self.result["servers"] = {"local": srv.local, **_server_versions(srv)}
            self.srv = srv
            self._step("preload", self._preload)
            for name in self.scenarios:
                self._step(name, getattr(self, f"_{name}"))
        self.result["load_average_end"] = list(infra.load_average())
        self.result["elapsed_s"] = time.monotonic() - t0
        self.result["logs"] = str(self.workdir)
        self.result["table"] = self.progress.rows
        self.console.print(self.progress.table())
        return self.result

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # one scenario's failure must not hide the others
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.progress.add(name, "error", "-", str(exc).splitlines()[0][:120])
            (self.workdir / f"{name}.traceback").write_text(traceback.format_exc())
        self.result.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 1)
        # the machine may be shared: the load after each step says how quiet it was
        self.result.setdefault("step_load_average", {})[name] = list(infra.load_average())

    # ------------------------------------------------------------------ scenarios

    def _load(self, meters: int, readings: int) -> tuple[str, dict[int, int], Any]:
        topic = f"raw_readings.bench.{meters}.{infra.tag()}"
        summary = infra.preload(self.srv.bootstrap, topic,
                                SimulatorOptions(meters=meters, count=readings))
        return topic, end_offsets(self.srv.bootstrap, topic), summary

    def _preload(self) -> None:
        p = self.plan
        self.topic, self.ends, summary = self._load(p.meters, p.readings)
        self.result["dataset"] = {"topic_partitions": len(self.ends), "meters": p.meters,
                                  "readings": summary.messages, "bytes": summary.bytes,
                                  "produce_readings_per_s": summary.rate}
        self.progress.add("preload", f"{p.meters:,} meters", f"{summary.messages:,} msgs",
                          f"simulator at {_rate(summary.rate)}")

    def _ceiling(self) -> None:
        out = {}
        cases: list[tuple[str, bool, dict[str, int] | None, int, str]] = [
            ("read", False, None, ceiling.BATCH, "service prefetch, 100k batches"),
            ("read_decode", True, None, ceiling.BATCH, "the same, decoding"),
            ("read_librdkafka_defaults", False, {}, ceiling.DEFAULTS_BATCH,
             "librdkafka defaults, 10k batches"),
        ]
        for name, decode, fetch, batch, note in cases:
            out[name] = r = ceiling.read_topic(self.srv.bootstrap, self.topic, self.ends,
                                               decode=decode, fetch=fetch, batch=batch)
            self.progress.add("ceiling", name.replace("_", " "), _rate(r["readings_per_s"]),
                              f"1 consumer; {note}")
        self.result["scenarios"]["ceiling"] = out

    def _pipeline(self) -> None:
        runs = self.result["scenarios"]["pipeline"] = []
        ceiling = self.result["scenarios"].get("ceiling", {}).get("read", {})
        for workers in self.plan.workers:
            r = run_pipeline(self.srv, self.topic, self.ends, workers=workers,
                             workdir=self.workdir)
            if ceiling:
                r["ratio_to_read_ceiling"] = r["readings_per_s"] / ceiling["readings_per_s"]
            if workers == max(self.plan.workers):
                self._regional_cost(r, self.topic, self.ends, workers, self.plan.meters)
                self._dedup_cost(r, workers)
            runs.append(r)
            ratio = r.get("ratio_to_read_ceiling")
            self.progress.add("pipeline", f"{workers} worker(s), {self.plan.meters:,} meters",
                              _rate(r["readings_per_s"]),
                              (f"{ratio:.0%} of read ceiling; " if ratio else "")
                              + f"RSS {r['worker_peak_rss_mb']} MB")

    def _scaling(self) -> None:
        runs = self.result["scenarios"]["scaling"] = []
        for meters in self.plan.scaling_meters:
            topic, ends, _ = self._load(meters, self.plan.scaling_readings)
            r = run_pipeline(self.srv, topic, ends, workers=2, workdir=self.workdir)
            r["meters"] = meters
            if meters == max(self.plan.scaling_meters):
                self._regional_cost(r, topic, ends, 2, meters)
            runs.append(r)
            self.progress.add("scaling", f"{meters:,} meters, 2 workers",
                              _rate(r["readings_per_s"]),
                              f"{r['worker_cpu_us_per_reading']:.2f} CPU µs/reading; "
                              f"RSS {r['worker_peak_rss_mb']} MB")

    def _scaling_dense(self) -> None:
        """The simulator's 10 s interval of event time, so at 10 readings per meter every
        1-minute window holds about 6 and checkpoints merge as in the field."""
        if self.plan.scaling_dense is None:
            return
        meters, readings = self.plan.scaling_dense
        topic, ends, _ = self._load(meters, readings)
        r = run_pipeline(self.srv, topic, ends, workers=2, workdir=self.workdir)
        r["meters"], r["readings_per_meter"] = meters, readings / meters
        self.result["scenarios"]["scaling_dense"] = r
        self.progress.add("scaling", f"{meters:,} meters × {readings // meters} readings, "
                          "2 workers", _rate(r["readings_per_s"]),
                          f"{r['worker_cpu_us_per_reading']:.2f} CPU µs/reading; "
                          f"RSS {r['worker_peak_rss_mb']} MB")

    def _regional_cost(self, on: dict[str, Any], topic: str, ends: dict[int, int],
                       workers: int, meters: int) -> None:
        """Run the same topic again with regional aggregates off; the cost is the share
        of readings/s the run with them (the default) gave up."""
        if not self.plan.regional_compare:
            return
        off = run_pipeline(self.srv, topic, ends, workers=workers, workdir=self.workdir,
                           extra_env={"REGIONAL_AGGREGATES": "off"})
        on["regional_off_readings_per_s"] = off["readings_per_s"]
        # a run that consumed nearly everything before its first poll measured no rate (a
        # quick-mode size): no cost then, rather than a division by zero
        measured = off["readings_per_s"] > 0 and on["readings_per_s"] > 0
        on["regional_cost"] = (1 - on["readings_per_s"] / off["readings_per_s"]
                               if measured else None)
        self.progress.add("regional", f"{workers} worker(s), {meters:,} meters, off",
                          _rate(off["readings_per_s"]),
                          f"regional aggregates cost {on['regional_cost']:.1%} of readings/s"
                          if measured else "too short a run to compare")

    def _dedup_cost(self, on: dict[str, Any], workers: int) -> None:
        """Run the same topic again with DEDUPLICATE=off (the default is on)."""
        if not self.plan.dedup_compare:
            return
        off = run_pipeline(self.srv, self.topic, self.ends, workers=workers,
                           workdir=self.workdir, extra_env={"DEDUPLICATE": "off"})
        on["dedup_off"] = off
        measured = off["readings_per_s"] > 0 and on["readings_per_s"] > 0
        on["dedup_cost"] = 1 - on["readings_per_s"] / off["readings_per_s"] if measured else None
        self.progress.add("dedup", f"{workers} worker(s), {self.plan.meters:,} meters, off",
                          _rate(off["readings_per_s"]),
                          (f"DEDUPLICATE costs {on['dedup_cost']:.1%} of readings/s; "
                           if measured else "") + f"RSS on {on['worker_peak_rss_mb']} / off "
                          f"{off['worker_peak_rss_mb']} MB")

    def _max_rate(self) -> float:
        runs = self.result["scenarios"].get("pipeline") or []
        best = max((r["readings_per_s"] for r in runs), default=0.0)
        return best or (50_000.0 if self.plan.mode == "quick" else 200_000.0)

    def _latency(self) -> None:
        """At half the measured maximum (the target's rate), then at lower fractions."""
        p = self.plan
        for fraction in p.latency_fractions:
            rate = self._max_rate() * fraction
            if p.mode == "quick":
                rate = min(rate, 20_000.0)
            r = run_latency(self.srv, rate=rate, meters=p.latency_meters,
                            duration_s=p.latency_duration_s, workers=max(p.workers),
                            workdir=self.workdir, flush_interval_ms=p.latency_flush_ms,
                            time_speedup=p.latency_speedup)
            r["fraction_of_max"] = fraction
            key = "latency" if fraction == 0.5 else f"latency_at_{fraction:g}_of_max"
            self.result["scenarios"][key] = r
            for what in ("alert", "window_row"):
                s = r[what]
                fig = (f"p50 {s['p50_ms']:.0f} / p99 {s['p99_ms']:.0f} ms"
                       if s["count"] else "no samples")
                self.progress.add("latency", f"{what.replace('_', ' ')} @ {rate:,.0f}/s", fig,
                                  f"{s['count']} samples, {fraction:g} of max")

    def _checkpoint(self) -> None:
        if self.plan.dedup_compare:
            sizes = [n for n in self.plan.checkpoint_sizes if n <= 100_000]
            compared = run_checkpoint_dedup(self.srv, sizes)
            self.result["scenarios"]["checkpoint_dedup"] = compared
            for r in compared:
                self.progress.add("dedup", f"checkpoint, {r['partials']:,} partials",
                                  f"{r['new_on_s']:.3f} / {r['merge_on_s']:.3f} s",
                                  f"new / merge with identities; off {r['new_off_s']:.3f} / "
                                  f"{r['merge_off_s']:.3f} s; cost {r['new_cost']:+.1%} / "
                                  f"{r['merge_cost']:+.1%}")
            return
        rows = run_checkpoint(self.srv, list(self.plan.checkpoint_sizes))
        self.result["scenarios"]["checkpoint"] = rows
        for r in rows:
            runs = len(r["new_runs"])
            self.progress.add("checkpoint", f"{r['partials']:,} partials",
                              f"{r['new_s']:.3f} s / {r['merge_s']:.3f} s / "
                              f"{r['replay_s']:.3f} s / {r['restart_s']:.3f} s",
                              "new / merge / replay / restart"
                              + (f", median of {runs}" if runs > 1 else ""))

    def _peer(self) -> None:
        runs: list[dict[str, Any]] = []
        self.result["scenarios"]["peer"] = runs
        ours = {r["workers"]: r["readings_per_s"]
                for r in self.result["scenarios"].get("pipeline", [])}
        for n in self.plan.peer_instances:
            try:
                r = run_peer(self.srv, self.topic, self.ends, instances=n,
                             target=self.plan.peer_target, workdir=self.workdir)
            except PeerUnavailable as exc:
                runs.append({"instances": n, "unavailable": str(exc)})
                self.progress.add("peer", f"Quix Streams ×{n}", "unavailable", str(exc)[:100])
                continue
            if n in ours:
                r["segs_ratio"] = ours[n] / r["readings_per_s"]
            runs.append(r)
            ratio = r.get("segs_ratio")
            self.progress.add("peer", f"Quix Streams, {n} instance(s)",
                              _rate(r["readings_per_s"]),
                              (f"segs-stream is {ratio:.1f}× faster; " if ratio else "")
                              + f"RSS {r['peak_rss_mb']} MB")


def _machine() -> dict[str, Any]:
    import confluent_kafka

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    import os

    return {"machine": {
        "cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "decoder": "native" if NATIVE else "Python (segs.intake._fastscan not built)",
    }}


def _git() -> dict[str, Any]:
    """The code measured: commit, and files of segs/ changed but not committed."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             check=False)
        return res.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "segs", "cli").splitlines()}


def _server_versions(srv: infra.Servers) -> dict[str, Any]:
    import psycopg

    from segs.tools.local_servers import KAFKA_VERSION

    with psycopg.connect(srv.postgres_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {"kafka": KAFKA_VERSION if srv.local else "external",
            "postgresql": row[0] if row else "?"}
