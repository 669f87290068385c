"""sd_notify(3) without a dependency: readiness, watchdog and status for ``Type=notify``.

Every function is a silent no-op (returning False / None) when the process was not started
by systemd with a notification socket, so callers never need to check first.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("segs.systemd")


def _address(raw: str) -> str | bytes:
    # "@name" is a socket in the abstract namespace: a leading NUL byte on the wire.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; True when it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not raw.startswith(("/", "@")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(raw))
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc, extra={"notify_state": state})
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The watchdog period in seconds from ``WATCHDOG_USEC``, or None when not enabled.

    When ``WATCHDOG_PID`` is set it must name this process (a child that inherited the
    environment must not pet the watchdog). Ping at half the period or more often.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def ready() -> bool:
    """Start-up finished: the unit becomes active."""
    return notify("READY=1")


def watchdog() -> bool:
    """Keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Shutdown began."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """A configuration reload began."""
    return notify("RELOADING=1")


def status(text: str) -> bool:
    """One-line status shown by ``systemctl status``."""
    return notify("STATUS=" + " ".join(text.splitlines()))
