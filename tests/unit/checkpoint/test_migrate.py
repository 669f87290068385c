"""Reading ``shared_preload_libraries`` the way PostgreSQL writes it."""

from __future__ import annotations

import pytest

from segs.checkpoint.migrate import _names_timescaledb


@pytest.mark.parametrize(("libraries", "named"), [
    ("timescaledb", True),
    ("pg_stat_statements, timescaledb", True),
    ('"timescaledb",pg_stat_statements', True),
    ("$libdir/timescaledb.so", True),
    ("", False),
    ("pg_stat_statements", False),
    ("timescaledb-2.28.3", False),  # the versioned library is not the loader
    ("timescaledb_toolkit", False),
])
def test_names_timescaledb(libraries: str, named: bool) -> None:
    assert _names_timescaledb(libraries) is named
