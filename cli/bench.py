"""`segs-stream bench`: the end-to-end benchmark suite (see benchmarks/README.md)."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import click

from .main import handle_errors


@click.command()
@click.option("--quick", is_flag=True,
              help="Tiny sizes (a smoke run of every scenario, under 3 minutes).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True, help="Folder for <date>.json and <date>.png.")
@click.option("--scenarios", default=None,
              help="Comma-separated subset of: ceiling, pipeline, scaling, scaling_dense, "
                   "latency, checkpoint, peer (default: all).")
@click.option("--readme", type=click.Path(dir_okay=False), default=None,
              help="README whose figures section to regenerate [default: "
                   "benchmarks/README.md after a full run of every scenario into "
                   "benchmarks/results; none otherwise].")
@click.option("--wait-quiet", type=float, default=0.0, show_default=True,
              help="First wait up to this many seconds for the 1-minute load average "
                   "to fall below 1.0.")
@click.option("--latency-flush", type=click.FloatRange(min=0.1), default=None,
              help="FLUSH_INTERVAL_1M of the latency scenario, in seconds [default: 5 (1 with "
                   "--quick), "
                   "so that window rows are stored often; the service's default is 60]. "
                   "The scenario then runs for at least twice this plus 15 s.")
@click.option("--regional-compare/--no-regional-compare", default=True, show_default=True,
              help="Run the pipeline with the most workers, and the largest scaling size, "
                   "a second time with REGIONAL_AGGREGATES=off and report what regional "
                   "aggregates cost.")
@click.option("--dedup-compare", is_flag=True,
              help="Run the pipeline with the most workers a second time with DEDUPLICATE=off, "
                   "and the checkpoint scenario (sizes up to 100,000 partials) with and "
                   "without reading identities, alternating; report what DEDUPLICATE costs. "
                   "The checkpoint scenario then gives only that comparison.")
@handle_errors
def bench(quick: bool, out_dir: str, scenarios: str | None, readme: str | None,
          wait_quiet: float, latency_flush: float | None, regional_compare: bool,
          dedup_compare: bool) -> None:
    """Start real Kafka and PostgreSQL (or use SEGS_TEST_KAFKA / SEGS_TEST_POSTGRES_URL),
    pre-load a 6-partition topic with the simulator and measure: the read ceiling, the
    pipeline with 1 and 2 workers, scaling with meters, latency, checkpoints and Quix
    Streams on the same job. Writes JSON, a PNG chart and the README figures."""
    import dataclasses

    from rich.console import Console

    from segs.bench import infra, report
    from segs.bench.suite import FULL, QUICK, SCENARIOS, Suite

    chosen = tuple(s.strip() for s in scenarios.split(",")) if scenarios else SCENARIOS
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {', '.join(unknown)}; "
                                 f"choose from {', '.join(SCENARIOS)}", param_hint="--scenarios")
    console = Console()
    if wait_quiet > 0:
        infra.wait_for_quiet(1.0, wait_quiet, say=console.print)
    plan = QUICK if quick else FULL
    if latency_flush is not None:
        plan = dataclasses.replace(
            plan, latency_flush_ms=round(latency_flush * 1000),
            latency_duration_s=max(plan.latency_duration_s, 2 * latency_flush + 15))
    plan = dataclasses.replace(plan, regional_compare=regional_compare,
                               dedup_compare=dedup_compare)
    result = Suite(plan, chosen, console).run()
    result["command"] = "segs-stream bench " + " ".join(sys.argv[2:])
    result["targets"] = report.targets(result)
    stem = date.today().isoformat() + ("-quick" if quick else "")
    out = Path(out_dir)
    png = out / f"{stem}.png"
    result["chart"] = png.name if report.chart(result, png) else None
    json_path = out / f"{stem}.json"
    report.write_json(result, json_path)
    # The README's figures link results/<date>.json: regenerate them by default only from a
    # complete full run written there (a subset or --quick would overwrite them with gaps).
    complete = (not quick and set(chosen) == set(SCENARIOS) and plan == FULL
                and out.resolve() == Path("benchmarks/results").resolve())
    readme_path = Path(readme) if readme else Path("benchmarks/README.md") if complete else None
    if readme_path is not None:
        report.update_readme(readme_path, report.figures_markdown(result, json_path.name,
                                                                  result["chart"]))
    console.print(f"results: {json_path}" + (f", chart: {png}" if result["chart"] else "")
                  + (f", figures: {readme_path}" if readme_path else ""))
    for t in result["targets"]:
        console.print(f"  {t['target']}: {t['value']} (goal {t['goal']}, met: {t['met']})")
    if result["errors"]:
        console.print(f"[red]errors in: {', '.join(result['errors'])}[/] "
                      f"(logs and tracebacks in {result['logs']})")
        sys.exit(1)
