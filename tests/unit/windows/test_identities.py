"""The identity log: held one header per window, read one row per identity."""

from __future__ import annotations

import numpy as np

from segs.windows.identities import IdentityLog


def rows(log: IdentityLog) -> list[tuple[int, int, int, int]]:
    return list(zip(log.meter.tolist(), log.window_start_ms.tolist(), log.offset.tolist(),
                    log.partition.tolist(), strict=True))


def grouped() -> IdentityLog:
    return IdentityLog.grouped(np.array([3, 4], np.int32), np.array([60_000, 120_000]),
                               np.array([0, 1], np.int32), np.array([2, 1]),
                               np.array([5, 7, 9], np.uint16))


def test_a_grouped_log_reads_as_rows() -> None:
    g = grouped()
    assert len(g) == 3
    assert rows(g) == [(3, 60_000, 5, 0), (3, 60_000, 7, 0), (4, 120_000, 9, 1)]
    assert [a.tolist() for a in g.windows()] == [[3, 4], [60_000, 120_000], [2, 1]]


def test_take_keeps_headers_for_whole_windows_and_rows_otherwise() -> None:
    g = grouped()
    by_partition = g.take(g.partition == 1)
    assert rows(by_partition) == [(4, 120_000, 9, 1)]
    assert by_partition.windows()[2].tolist() == [1]
    assert by_partition.nbytes() < g.nbytes()
    assert rows(g.take(np.array([False, True, True]))) == rows(g)[1:]
    assert rows(g.take(np.array([2, 0]))) == [rows(g)[2], rows(g)[0]]
    assert rows(g.take(np.zeros(3, bool))) == []


def test_concat_of_grouped_and_rows() -> None:
    g = grouped()
    one = IdentityLog(np.array([8], np.int32), np.array([0]), np.array([1], np.uint16),
                      np.array([2], np.int32))
    both = IdentityLog.concat([g, one, IdentityLog.empty()])
    assert rows(both) == [*rows(g), *rows(one)]
    assert both.windows()[2].tolist() == [2, 1, 1]
    assert rows(IdentityLog.concat([one, one])) == rows(one) * 2
    assert len(IdentityLog.concat([])) == 0


def test_of_partitions_is_take_by_partition() -> None:
    g = grouped()
    one = IdentityLog(np.array([8, 9], np.int32), np.array([0, 0]), np.array([1, 2], np.uint16),
                      np.array([1, 0], np.int32))
    for log in (g, one, IdentityLog.concat([g, one])):
        for keep in ([0], [1], [0, 1], []):
            want = log.take(np.isin(log.partition, keep))
            assert rows(log.of_partitions(np.array(keep, np.int32))) == rows(want)
