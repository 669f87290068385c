"""The worker's glibc heap settings."""

from __future__ import annotations

import platform

import pytest

from segs.runtime import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arenas_are_capped_unless_the_operator_chose() -> None:
    assert heap.limit_arenas(environ={}) is True
    assert heap.limit_arenas(environ={"MALLOC_ARENA_MAX": "8"}) is False
    heap.give_back_heap()  # no error, whatever it gives back
