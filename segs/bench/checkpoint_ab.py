"""The checkpoint scenario of several checkouts, side by side on one PostgreSQL server.

    .venv/bin/python -m segs.bench.checkpoint_ab BEFORE AFTER [...] [--rounds 8]
        [--partials 100000] [--json PATH]

Each argument is a checkout with its own installed ``.venv`` (``git worktree add`` and
``make install``). A round runs every checkout's own :func:`segs.bench.checkpoint.
run_checkpoint` (its schema, its sink; three fresh databases per size) once, in an order
rotated from round to round, so that what the machine does meanwhile falls on all of them
alike. On this 2-core machine a single run of one checkout spreads by ±20 %, more than most
differences worth measuring; medians over rounds taken this way do not. Reported per
checkout and phase: the median of all runs and its ratio to the first checkout's (a dash
for a phase the checkout's scenario does not have yet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from segs.bench.checkpoint import PHASES
from segs.tools.local_servers import LocalPostgres

# run in each checkout's own interpreter: its run_checkpoint against the shared server
_CHILD = """
import json, sys
from segs.bench.checkpoint import run_checkpoint
from segs.bench.infra import Servers
sizes = [int(n) for n in sys.argv[2].split(",")]
print(json.dumps(run_checkpoint(Servers("unused:9092", sys.argv[1], local=False), sizes)))
"""


def _one(checkout: Path, url: str, sizes: list[int]) -> list[dict[str, Any]]:
    python = checkout / ".venv" / "bin" / "python"
    done = subprocess.run([str(python), "-c", _CHILD, url, ",".join(map(str, sizes))],
                          cwd=checkout, capture_output=True, text=True, check=False)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{checkout}: the checkpoint scenario failed: {tail[0]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="+", type=Path,
                    help="checkouts with an installed .venv; the first is the reference")
    ap.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    ap.add_argument("--partials", default="100000",
                    help="comma-separated checkpoint sizes (default 100000)")
    ap.add_argument("--json", type=Path, help="write every run here")
    args = ap.parse_args()
    sizes = [int(n) for n in args.partials.split(",")]
    for c in args.checkouts:
        if not (c / ".venv" / "bin" / "python").exists():
            ap.error(f"{c} has no .venv: run `make install` there first")
    runs: dict[str, list[list[dict[str, Any]]]] = {str(c): [] for c in args.checkouts}
    with LocalPostgres() as pg:
        for r in range(args.rounds):
            k = r % len(args.checkouts)
            for c in args.checkouts[k:] + args.checkouts[:k]:
                t0 = time.monotonic()
                rows = _one(c, pg.url, sizes)
                runs[str(c)].append(rows)
                print(f"round {r + 1}/{args.rounds} {c}: " + "; ".join(
                    f"{row['partials']:,}: " + " / ".join(
                        _figure(row.get(f"{ph}_s")) for ph in PHASES) for row in rows)
                    + f" s ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    ref = str(args.checkouts[0])
    for i, n in enumerate(sizes):
        print(f"{n:,} partials, median of {args.rounds} rounds × 3 runs, "
              f"{' / '.join(PHASES)} (ratio to {ref}):")
        medians = {c: [statistics.median(x for rows in rr for x in rows[i][f"{ph}_runs"])
                       if f"{ph}_runs" in rr[0][i] else None for ph in PHASES]
                   for c, rr in runs.items()}
        for c, m in medians.items():
            ratios = " / ".join("–" if v is None or r is None else f"{v / r:.2f}"
                                for v, r in zip(m, medians[ref], strict=True))
            print(f"  {c}: {' / '.join(_figure(v) for v in m)} s  ({ratios})")


def _figure(seconds: float | None) -> str:
    """Seconds, or a dash for a phase an older checkout's scenario does not have."""
    return "–" if seconds is None else f"{seconds:.3f}"


if __name__ == "__main__":
    main()
