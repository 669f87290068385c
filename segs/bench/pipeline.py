"""Pipeline (and scaling): `segs-stream run --workers N` over a pre-loaded topic.

Readings/s is measured from the first consumed batch (``stream_messages_total`` on /metrics
turning positive, polled every 0.1 s; the messages counted by then are left out) to the
moment the stored positions in the database cover the whole topic. As soon as every
message is consumed the service gets SIGTERM, so the end is its final checkpoint, not an
idle wait for the next flush interval. Worker RSS is the peak (``VmHWM``) of each worker
process; CPU is user + system time of the workers, per reading.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from segs.bench.infra import OutputTopics, Servers, fresh_database, service
from segs.errors import InfraError
from segs.tools.harness import covered, stored_positions
from segs.tools.procfs import cpu_seconds, status_kb

POLL_S = 0.1


def run_pipeline(srv: Servers, topic: str, ends: dict[int, int], *, workers: int,
                 workdir: Path, timeout_s: float = 900,
                 extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    total = sum(ends.values())
    topics = OutputTopics(topic)
    topics.create(srv.bootstrap)
    with fresh_database(srv.postgres_url) as db:
        log_path = workdir / f"pipeline-{topics.suffix}.log"
        svc = service(srv.bootstrap, db, topics, workers, log_path, **(extra_env or {}))
        peak_kb: dict[int, int] = {}
        cpu: dict[int, float] = {}

        def sample() -> None:
            for pid in svc.worker_pids():
                peak_kb[pid] = max(peak_kb.get(pid, 0), status_kb(pid, "VmHWM"))
                cpu[pid] = max(cpu.get(pid, 0.0), cpu_seconds(pid))

        with svc:
            deadline = time.monotonic() + timeout_s
            first_t: float | None = None
            first_n = 0.0
            n = 0.0
            while n < total:
                if time.monotonic() > deadline:
                    raise InfraError(f"pipeline consumed {n:.0f} of {total} in {timeout_s} s")
                svc.check_alive()
                n = svc.metric("stream_messages_total")
                if first_t is None and n > 0:
                    first_t, first_n = time.perf_counter(), n
                sample()
                time.sleep(POLL_S)
            consumed_t = time.perf_counter()
            sample()
            assert svc.proc is not None
            svc.proc.terminate()  # final checkpoint now, not at the next flush interval
            while True:
                sample()
                if covered(ends, stored_positions(db, topics.group, topic)):
                    break
                if svc.proc.poll() is not None:
                    raise InfraError("segs-stream run exited before storing every position: "
                                     + log_path.read_text(errors="replace")[-1500:])
                time.sleep(POLL_S / 2)
            committed_t = time.perf_counter()
            code = svc.stop()
    assert first_t is not None
    counted = total - first_n
    return {
        "workers": workers, "messages": total,
        "seconds": committed_t - first_t,
        "readings_per_s": counted / (committed_t - first_t),
        "consume_readings_per_s": counted / max(consumed_t - first_t, 1e-9),
        "final_checkpoint_s": committed_t - consumed_t,
        "worker_peak_rss_mb": sorted(round(kb / 1024, 1) for kb in peak_kb.values()),
        "worker_cpu_us_per_reading": sum(cpu.values()) * 1e6 / total,
        "exit_code": code,
    }
