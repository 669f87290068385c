"""``segs-stream simulate``: synthetic smart-meter readings into Kafka (and/or a file)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from segs.errors import ConfigError, SegsError
from segs.times import iso_ms
from segs.tools.simulator import (
    ANOMALY_KINDS,
    KINDS,
    SimMessage,
    SimulatorOptions,
    SimulatorSummary,
    generate,
    produce,
    write_file,
)

_F = TypeVar("_F", bound=Callable[..., Any])

# SimulatorOptions field → the flag a user types
_FLAGS = {
    "meters": "--meters",
    "regions": "--regions",
    "count": "--count",
    "duration_s": "--duration",
    "rate": "--rate",
    "interval_s": "--interval",
    "start_ms": "--start",
    "seed": "--seed",
    "anomaly_fraction": "--anomalies",
    "duplicate_fraction": "--duplicates",
    "out_of_order_fraction": "--out-of-order",
    "late_fraction": "--late",
    "invalid_fraction": "--invalid",
    "fractions": "--duplicates/--late/--invalid/--out-of-order",
}
_RELATIVE = re.compile(r"^now(?:\s*-\s*(\d+(?:\.\d+)?)\s*([smhd]))?$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_start(text: str) -> int:
    """``--start``: ISO-8601 with a zone, epoch milliseconds, ``now`` or ``now-90m``."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    rel = _RELATIVE.match(t)
    if rel:
        amount = float(rel.group(1) or 0)
        return time.time_ns() // 1_000_000 - round(amount * _UNIT_MS[rel.group(2) or "s"])
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} is not ISO-8601 with a zone (2026-11-27T06:00:00Z), epoch "
            "milliseconds, 'now' or 'now-2h'",
            param_hint="'--start'",
        )
    return round(when.timestamp() * 1000)


def _fraction(name: str, what: str, default: float = 0.0) -> Callable[[_F], _F]:
    return click.option(
        name,
        type=click.FloatRange(0.0, 1.0),
        default=default,
        show_default=True,
        metavar="FRACTION",
        help=what,
    )


@click.command("simulate")
@click.option(
    "--meters",
    type=click.IntRange(1, 10_000_000),
    default=1000,
    show_default=True,
    help="Number of simulated meters (MTR-00000001 …); each sends one reading per interval.",
)
@click.option(
    "--regions",
    type=click.IntRange(1, 10_000),
    default=5,
    show_default=True,
    help="Number of regions: north, south, east, west, central, then region-6 ….",
)
@click.option(
    "--count",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many messages (all kinds together).  [default: no limit]",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop after this many seconds of wall-clock time.  [default: no limit; "
    "with neither --count nor --duration, run until Ctrl+C]",
)
@click.option(
    "--rate",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    metavar="MSG/S",
    help="Messages per second to aim for; 0 = as fast as possible.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.001, 86400),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Event time between two readings of the same meter (energyKwh = powerKw "
    "× interval / 3600).",
)
@click.option(
    "--start",
    "start",
    default=None,
    metavar="TIME",
    help="Event time of the first round: ISO-8601 with a zone "
    "(2026-11-27T06:00:00Z), epoch milliseconds, 'now' or 'now-2h' (s/m/h/d). "
    "[default: so that the last reading is about now; never in the future]",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Random seed: the same seed and options give the same messages.",
)
@_fraction(
    "--anomalies",
    "Share of readings that are spikes (3–5 × base load), drops "
    "(0.25–0.4 ×) or outages (0 kW); at most one per meter per 10 min "
    "of event time, each detected exactly once.",
    default=0.001,
)
@_fraction("--duplicates", "Share of messages that re-send an earlier message byte for byte.")
@_fraction("--out-of-order", "Share of messages delayed by 1–8 positions.")
@_fraction(
    "--late",
    "Share of messages carrying an event time 70 s – 60 min in the past "
    "(for an already closed window).",
)
@_fraction(
    "--invalid",
    "Share of broken messages (not JSON, truncated, missing or mistyped "
    "field, negative/NaN power, timestamp without zone or far in the "
    "future, non-UTF-8 …); they belong in the dead-letter topic.",
)
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write every message, in production order, to this JSON-lines file "
    '({"key","value" or "value_b64","kind","anomaly"}).',
)
@click.option(
    "--no-kafka",
    is_flag=True,
    help="Do not produce to Kafka; only generate (into --file when given).",
)
@click.option(
    "--topic",
    envvar="KAFKA_TOPIC_INPUT",
    default="raw_readings",
    show_default=True,
    show_envvar=True,
    help="Topic to produce to.",
)
@click.option(
    "--brokers",
    envvar="KAFKA_BROKERS",
    default="localhost:9092",
    show_default=True,
    show_envvar=True,
    help="Kafka bootstrap servers, comma separated.",
)
@click.option(
    "-X",
    "--producer-option",
    "producer_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra librdkafka producer setting (e.g. security.protocol=SASL_SSL, "
    "compression.type=none); repeatable.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0.1, 300),
    default=8.0,
    show_default=True,
    metavar="SECONDS",
    help="Give up when the brokers do not answer within this time.",
)
@click.option("--quiet", is_flag=True, help="No progress display.")
def simulate(
    meters: int,
    regions: int,
    count: int | None,
    duration: float | None,
    rate: float,
    interval: float,
    start: str | None,
    seed: int,
    anomalies: float,
    duplicates: float,
    out_of_order: float,
    late: float,
    invalid: float,
    file: Path | None,
    no_kafka: bool,
    topic: str,
    brokers: str,
    producer_options: tuple[str, ...],
    connect_timeout: float,
    quiet: bool,
) -> None:
    """Simulate smart-meter readings into the input topic.

    Each meter has a base load of 1.5–5 kW and sends one JSON reading per --interval of event
    time, keyed by its meter id, in the format of the original SEGS simulator. Anomalies,
    duplicates, out-of-order, late and invalid messages can be mixed in. A summary table is
    printed at the end; Ctrl+C stops cleanly (a second one aborts).
    """
    try:
        opts = SimulatorOptions(
            meters=meters,
            regions=regions,
            count=count,
            duration_s=duration,
            rate=rate,
            interval_s=interval,
            start_ms=None if start is None else parse_start(start),
            seed=seed,
            anomaly_fraction=anomalies,
            duplicate_fraction=duplicates,
            out_of_order_fraction=out_of_order,
            late_fraction=late,
            invalid_fraction=invalid,
        )
    except ConfigError as exc:
        raise click.UsageError(f"{_FLAGS.get(exc.setting, exc.setting)}: {exc.problem}") from exc

    config = {"bootstrap.servers": brokers}
    for item in producer_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'-X'")
        config[key.strip()] = value.strip()

    if no_kafka:
        summary = _generate_only(opts, file)
    else:
        try:
            summary = produce(
                opts,
                config,
                topic,
                file=file,
                progress=not quiet,
                connect_timeout_s=connect_timeout,
            )
        except SegsError as exc:
            raise click.ClickException(str(exc)) from exc
    _print_summary(summary)
    if summary.delivery_errors:
        raise click.ClickException(
            f"{summary.delivery_errors:,} messages were not delivered ({summary.last_error})"
        )


def _generate_only(opts: SimulatorOptions, file: Path | None) -> SimulatorSummary:
    """``--no-kafka``: generate (into ``file`` when given) and count."""
    kinds = dict.fromkeys(KINDS, 0)
    found = dict.fromkeys(ANOMALY_KINDS, 0)
    sent = nbytes = 0
    t0 = time.perf_counter()

    def counted() -> Iterator[SimMessage]:
        nonlocal sent, nbytes
        for batch in generate(opts):
            for m in batch:
                kinds[m.kind] += 1
                if m.anomaly:
                    found[m.anomaly] += 1
                nbytes += len(m.value)
                sent += 1
                yield m

    interrupted = False
    try:
        if file is not None:
            write_file(file, counted())
        else:
            for _ in counted():
                pass
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - t0
    return SimulatorSummary(
        messages=sent,
        kinds=kinds,
        anomalies=found,
        bytes=nbytes,
        elapsed_s=elapsed,
        rate=sent / elapsed if elapsed > 0 else 0.0,
        delivery_errors=0,
        last_error=None,
        interrupted=interrupted,
        start_ms=opts.start_ms or 0,
        last_event_ms=None,
        topic=None,
        file=file,
    )


def _print_summary(s: SimulatorSummary) -> None:
    table = Table(title="simulate: summary" + (" (interrupted)" if s.interrupted else ""))
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("messages", f"{s.messages:,}")
    for kind in KINDS:
        table.add_row(f"  {kind}", f"{s.kinds.get(kind, 0):,}")
    for kind in ANOMALY_KINDS:
        table.add_row(f"  anomaly: {kind}", f"{s.anomalies.get(kind, 0):,}")
    table.add_row("bytes", f"{s.bytes:,}")
    table.add_row("elapsed", f"{s.elapsed_s:.2f} s")
    table.add_row("rate", f"{s.rate:,.0f} msg/s")
    if s.start_ms:
        table.add_row("first event time", iso_ms(s.start_ms))
    if s.last_event_ms is not None:
        table.add_row("last event time", iso_ms(s.last_event_ms))
    table.add_row("topic", s.topic or "-")
    table.add_row("file", str(s.file) if s.file else "-")
    if s.delivery_errors:
        table.add_row("delivery errors", f"{s.delivery_errors:,}")
    Console(width=100).print(table)
