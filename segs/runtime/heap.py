"""glibc heap settings of a worker process (no-ops on other C libraries).

A worker allocates from several threads: the loop, the checkpoint's writers and librdkafka's
own. glibc gives each thread that contends for the heap an arena of its own, up to 8 per
core, and every arena keeps the memory freed in it; a checkpoint's transients, encoded in
the writers, then stay resident in arenas no one allocates from again. Two arenas hold
what the threads need at once without that retention (``benchmarks/README.md``, "Meter ids
in an arena")."""

from __future__ import annotations

import contextlib
import ctypes
import os

ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter, glibc's malloc.h


def limit_arenas(environ: dict[str, str] | None = None) -> bool:
    """Cap glibc's heap arenas at :data:`ARENAS`, unless the operator set
    ``MALLOC_ARENA_MAX`` (glibc reads it itself). Whether the cap was set."""
    if "MALLOC_ARENA_MAX" in (os.environ if environ is None else environ):
        return False
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, ARENAS))
    return False


def give_back_heap() -> None:
    """glibc's ``malloc_trim(0)``: free heap pages back to the kernel.
    After a large eviction the freed names and dict entries would otherwise stay resident,
    and the next wave's transients land on top of them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
