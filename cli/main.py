"""The `segs-stream` command: run the service, migrate, simulate, demo, bench, config."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from segs import __version__
from segs.config import SPECS, Settings, ignored_settings, load_settings
from segs.errors import ConfigError, SegsError

F = TypeVar("F", bound=Callable[..., Any])

_ENV_HELP = "\n".join(f"  {s.env:<24} {s.help} (default: {s.default or 'unset'})"
                      for s in SPECS)


def fail(message: str, code: int = 1) -> None:
    """Print one error line and exit; never a traceback."""
    click.echo(f"segs-stream: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn our errors into one line: exit 2 for configuration, 1 otherwise."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), 2)
        except SegsError as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def _env_file(ctx: click.Context) -> Path:
    env_file = ctx.find_root().params.get("env_file")
    return Path(env_file) if env_file else Path(".env")


def settings_from(ctx: click.Context, overrides: dict[str, Any]) -> Settings:
    return load_settings(overrides, env_file=_env_file(ctx))


def ignored_line(ctx: click.Context) -> str | None:
    """One line naming what the `.env` file (or the environment, for the TypeScript
    service's own settings) holds that is no setting here; None when nothing is."""
    names = ignored_settings(_env_file(ctx))
    if not names:
        return None
    return f"ignored, not settings of segs-stream: {', '.join(names)}"


def log_ignored(ctx: click.Context) -> None:
    line = ignored_line(ctx)
    if line:
        logging.getLogger("segs.config").info("%s", line)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Settings come from environment variables, a .env file and flags (flags win):\n\n"
           + _ENV_HELP,
)
@click.version_option(__version__, prog_name="segs-stream")
@click.option("--env-file", type=click.Path(dir_okay=False), default=".env", show_default=True,
              help="File of KEY=VALUE settings, read below the process environment.")
def main(env_file: str) -> None:
    """Smart-meter readings from Kafka into exact 1-minute and 15-minute aggregates in
    TimescaleDB/PostgreSQL, with spike, drop and outage alerts published back to Kafka."""


@main.command()
@click.option("--workers", "-w", type=int, default=None,
              help="Worker processes, one Kafka consumer each (env WORKERS; default: CPUs).")
@click.option("--brokers", default=None, help="Kafka bootstrap servers (env KAFKA_BROKERS).")
@click.option("--group-id", default=None, help="Consumer group (env KAFKA_GROUP_ID).")
@click.option("--postgres-url", default=None, help="Database URL (env POSTGRES_URL).")
@click.option("--port", type=int, default=None, help="HTTP port for /metrics (env PORT).")
@click.option("--host", default=None, help="HTTP bind address (env HOST).")
@click.option("--log-level", default=None, help="debug, info, warning, error (env LOG_LEVEL).")
@click.pass_context
@handle_errors
def run(ctx: click.Context, workers: int | None, brokers: str | None, group_id: str | None,
        postgres_url: str | None, port: int | None, host: str | None,
        log_level: str | None) -> None:
    """Run the service: migrate, then consume with N worker processes until SIGTERM.

    Serves /metrics, /health and /ready on HOST:PORT. Exit code 0 when every worker wrote
    its final checkpoint."""
    settings = settings_from(ctx, {
        "WORKERS": workers, "KAFKA_BROKERS": brokers, "KAFKA_GROUP_ID": group_id,
        "POSTGRES_URL": postgres_url, "PORT": port, "HOST": host, "LOG_LEVEL": log_level,
    })
    from segs.runtime.supervisor import prepare_metrics_dir, remove_metrics_dir

    folder, own = prepare_metrics_dir()
    from segs.ops.logs import setup_logging
    from segs.runtime.supervisor import Supervisor

    setup_logging(settings.log_level,
                  json_lines={"json": True, "text": False}.get(settings.log_format))
    log_ignored(ctx)
    try:
        code = Supervisor(settings).run()
    finally:
        if own:
            remove_metrics_dir(folder)
    sys.exit(code)


@main.command()
@click.option("--postgres-url", default=None, help="Database URL (env POSTGRES_URL).")
@click.pass_context
@handle_errors
def migrate(ctx: click.Context, postgres_url: str | None) -> None:
    """Create or upgrade the schema (idempotent) and say which storage mode is in use.

    With TimescaleDB installed and preloaded, aggregate tables that are not hypertables yet
    are converted (each is locked while its rows move into chunks)."""
    from segs.checkpoint.migrate import migrate as apply
    from segs.ops.logs import setup_logging

    settings = settings_from(ctx, {"POSTGRES_URL": postgres_url})
    setup_logging(settings.log_level,
                  json_lines={"json": True, "text": False}.get(settings.log_format))
    log_ignored(ctx)
    result = apply(settings.postgres_url.get(), settings.policies())
    applied = ", ".join(result.applied) or "none (already up to date)"
    click.echo(f"schema versions applied: {applied}")
    click.echo(f"storage mode: {result.mode}")


@main.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@click.pass_context
@handle_errors
def config_show(ctx: click.Context) -> None:
    """Print every setting with its effective value (secrets masked)."""
    settings = settings_from(ctx, {})
    for env, shown in settings.describe():
        click.echo(f"{env}={shown}")


@config.command("check")
@click.pass_context
@handle_errors
def config_check(ctx: click.Context) -> None:
    """Validate the configuration; exit 2 with one line naming a bad setting."""
    settings_from(ctx, {})
    line = ignored_line(ctx)
    if line:
        click.echo(line)
    click.echo("configuration ok")


def _register() -> None:
    from .simulate import simulate

    main.add_command(simulate)
    try:
        from .demo import demo
    except ImportError:  # pragma: no cover - during bootstrap
        return
    main.add_command(demo)
    try:
        from .bench import bench
    except ImportError:  # pragma: no cover
        return
    main.add_command(bench)


_register()
