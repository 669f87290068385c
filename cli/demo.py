"""``segs-stream demo``: the whole service on this machine, end to end, with a summary.

Starts a throwaway Kafka broker and PostgreSQL server (see :mod:`segs.tools.local_servers`),
creates the topics, migrates, starts ``segs-stream run`` as a child process, streams
simulated readings into it with live progress, waits until every reading is stored, stops
the service with SIGTERM and prints what happened. Everything it started is stopped on the
way out, also on Ctrl+C.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import click
import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from segs.checkpoint.migrate import migrate
from segs.tools.harness import (
    Service,
    create_topics,
    end_offsets,
    service_env,
    stored_positions,
)
from segs.tools.local_servers import LocalKafka, LocalPostgres
from segs.tools.simulator import SimulatorOptions, produce

INPUT, GROUP = "raw_readings", "segs-stream"  # the service's default names
TOPICS = {INPUT: 6, "raw_readings.dlq": 1, "aggregates_1m": 3, "aggregates_15m": 3,
          "alerts": 3}
console = Console(stderr=True, width=None if sys.stderr.isatty() else 110)


@click.command()
@click.option("--meters", default=2_000, show_default=True, help="Simulated meters.")
@click.option("--count", default=300_000, show_default=True, help="Readings to stream.")
@click.option("--rate", default=50_000, show_default=True,
              help="Readings per second (0 = as fast as possible).")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--keep-dir", type=click.Path(file_okay=False), default=None,
              help="Keep server data and logs in this folder instead of a temporary one.")
def demo(meters: int, count: int, rate: int, workers: int, keep_dir: str | None) -> None:
    """Run the service end to end on local servers and summarise what it did.

    Needs Java 17 and Maven (Kafka's jars come from Maven Central on first use, into
    .cache/) and PostgreSQL server binaries (installed from Debian when missing, as root).
    """
    from .main import fail

    with contextlib.ExitStack() as stack:
        base = Path(keep_dir) if keep_dir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="segs-demo-")))
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
        try:
            _demo(stack, base, meters, count, rate, workers)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping everything[/]")
        except Exception as exc:  # one clear line for the user, never a traceback
            fail(f"demo failed: {exc}")


def _demo(stack: contextlib.ExitStack, base: Path, meters: int, count: int, rate: int,
          workers: int) -> None:
    with console.status("starting Kafka (KRaft) and PostgreSQL on loopback…"):
        kafka = stack.enter_context(LocalKafka(base / "kafka"))
        pg = stack.enter_context(LocalPostgres(base / "postgres"))
        create_topics(kafka.bootstrap, TOPICS)
        result = migrate(pg.url)
    console.print(f"[green]✓[/] Kafka {kafka.bootstrap}, PostgreSQL {pg.url} "
                  f"({result.mode}), topics {', '.join(TOPICS)}")

    env = service_env(kafka.bootstrap, pg.url, HOST="127.0.0.1", FLUSH_INTERVAL_1M="2000",
                      IDLE_ADVANCE="3")
    log_path = base / "service.log"
    service = stack.enter_context(Service(env, log_path, workers, stop_timeout_s=40))
    port = service.http_port()
    console.print(f"[green]✓[/] segs-stream run --workers {workers} (pid {service.pid}); "
                  f"metrics at http://127.0.0.1:{port}/metrics, log {log_path}")

    opts = SimulatorOptions(meters=meters, count=count, rate=float(rate), seed=42,
                            anomaly_fraction=0.002, duplicate_fraction=0.005,
                            out_of_order_fraction=0.01, late_fraction=0.002,
                            invalid_fraction=0.005)
    console.print(f"streaming {count:,} readings from {meters:,} meters"
                  f"{f' at {rate:,}/s' if rate else ''}…")
    summary = produce(opts, {"bootstrap.servers": kafka.bootstrap}, INPUT,
                      progress=True)
    console.print(f"[green]✓[/] produced {summary.messages:,} messages at "
                  f"{summary.rate:,.0f}/s")

    total = sum(end_offsets(kafka.bootstrap, INPUT).values())
    t0 = time.monotonic()
    # transient: the final line is printed below, also where no terminal shows the live one
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while True:
            done = sum(stored_positions(pg.url, GROUP, INPUT).values())
            live.update(f"stored positions cover {done:,} / {total:,} messages")
            if done >= total:
                break
            if not service.running():
                raise RuntimeError(f"the service exited with code {service.exit_code}; "
                                   f"see {log_path}")
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the service did not catch up within 5 minutes")
            time.sleep(0.25)
    console.print(f"[green]✓[/] stored positions cover all {total:,} messages "
                  f"({time.monotonic() - t0:.1f} s after the last was produced)")
    time.sleep(4)  # idle advance closes the newest windows; one more checkpoint publishes
    _wait_regional(pg.url)
    code = service.stop()
    console.print(f"[green]✓[/] service stopped with exit code {code}")
    _summary(pg.url, kafka.bootstrap, summary.messages)


def _wait_regional(url: str, timeout_s: float = 20) -> None:
    """Until every region-window of the stored 1-minute rows is rolled up and published
    (the last ones follow the idle advance of every partition)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM (SELECT DISTINCT region, window_start"
                "        FROM aggregates_1m) w),"
                " (SELECT count(*) FROM aggregates_1m_regional WHERE published)").fetchone()
        if row and row[1] >= row[0]:
            return
        time.sleep(0.5)


def _summary(url: str, bootstrap: str, produced: int) -> None:
    with psycopg.connect(url) as conn:
        readings, rows_1m = conn.execute(
            "SELECT coalesce(sum(sample_count), 0), count(*) FROM aggregates_1m").fetchone() \
            or (0, 0)
        rows_15m = (conn.execute("SELECT count(*) FROM aggregates_15m").fetchone() or (0,))[0]
        rows_regional = (conn.execute("SELECT count(*) FROM aggregates_1m_regional")
                         .fetchone() or (0,))[0]
        sample = conn.execute(
            "SELECT meter_id, region, to_char(window_start AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD HH24:MI'), sample_count, round(avg_power::numeric, 3),"
            " round(max_power::numeric, 3), round(min_power::numeric, 3),"
            " round(total_energy::numeric, 4) FROM aggregates_1m "
            "ORDER BY window_start DESC, meter_id LIMIT 8").fetchall()
    counts = {t: sum(end_offsets(bootstrap, t).values())
              for t in ("alerts", "raw_readings.dlq", "aggregates_1m", "aggregates_15m",
                        "aggregates_1m_regional")}
    table = Table(title="segs-stream demo summary", show_header=False)
    table.add_row("messages produced", f"{produced:,}")
    table.add_row("valid readings aggregated", f"{readings:,}")
    table.add_row("invalid messages → raw_readings.dlq", f"{counts['raw_readings.dlq']:,}")
    table.add_row("rows in aggregates_1m / aggregates_15m", f"{rows_1m:,} / {rows_15m:,}")
    table.add_row("closed windows published (1m / 15m)",
                  f"{counts['aggregates_1m']:,} / {counts['aggregates_15m']:,}")
    table.add_row("region-windows in aggregates_1m_regional / regional messages published",
                  f"{rows_regional:,} / {counts['aggregates_1m_regional']:,}")
    table.add_row("anomaly alerts published", f"{counts['alerts']:,}")
    console.print(table)
    rows = Table(title="latest aggregates_1m rows")
    for col in ("meter", "region", "window (UTC)", "readings", "avg kW", "max kW", "min kW", "kWh"):
        rows.add_column(col)
    for r in sample:
        rows.add_row(*(str(v) for v in r))
    console.print(rows)
