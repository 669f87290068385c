"""The identity slab against a model of sets: lookups, inserts out of order, growth,
relocation, take, forget and compaction in any interleaving."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.windows import slab as slab_module
from segs.windows.slab import IdentitySlab

OFFSETS = [0, 1, 2, 3, 500, 999, 30_000, 59_999, 65_535]


def check(slab: IdentitySlab, old: list[set[int]], new: list[set[int]]) -> None:
    """Each cell's region holds its old run, then its new run, both sorted."""
    assert slab.held == sum(len(o) + len(n) for o, n in zip(old, new, strict=True))
    assert slab._top <= slab._arena.shape[0] and slab._owned <= slab._top
    assert slab._owned == int(slab._cap.sum())
    for c in range(len(old)):
        at, o, n = int(slab._at[c]), int(slab._old[c]), int(slab._n[c])
        assert n <= slab._cap[c] and at + slab._cap[c] <= slab._top
        assert slab._arena[at:at + o].tolist() == sorted(old[c])
        assert slab._arena[at + o:at + n].tolist() == sorted(new[c])


operations = st.one_of(
    st.tuples(st.just("add"), st.lists(st.tuples(st.integers(0, 5), st.sampled_from(OFFSETS)),
                                       max_size=30)),
    st.tuples(st.just("take"), st.lists(st.integers(0, 5), unique=True)),
    st.tuples(st.just("forget"), st.lists(st.integers(0, 5), unique=True), st.booleans()),
    st.tuples(st.just("compact"), st.booleans()),
    st.tuples(st.just("grow"), st.sampled_from([0, 3, 6])),  # whole meters
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=25))
def test_slab_is_a_set_of_offsets_per_cell(ops: list[tuple[object, ...]]) -> None:
    slab = IdentitySlab(ring=3)  # cells 3k … 3k + 2: one meter
    slab.compact_min = 0  # compact as often as the rules allow
    cells = 6
    slab.grow(cells)
    old: list[set[int]] = [set() for _ in range(cells)]
    new: list[set[int]] = [set() for _ in range(cells)]
    for op in ops:
        if op[0] == "add":
            pairs: list[tuple[int, int]] = op[1]  # type: ignore[assignment]
            cell = np.array([c for c, _ in pairs], np.intp)
            off = np.array([o for _, o in pairs], np.int64)
            counted = slab.first_new(cell, off).tolist()
            seen: set[tuple[int, int]] = set()
            for i, (c, o) in enumerate(pairs):
                want = (c, o) not in seen and o not in old[c] and o not in new[c]
                seen.add((c, o))
                assert counted[i] == want
            for c, o in pairs:
                if o not in old[c]:
                    new[c].add(o)
        elif op[0] == "take":
            asked = np.array(op[1], np.intp)
            has, length, offsets = slab.take_new(asked)
            assert asked[has].tolist() == [c for c in op[1] if new[c]]  # type: ignore[attr-defined]
            runs = np.split(offsets, np.cumsum(length)[:-1]) if len(has) else []
            for c, run in zip(asked[has].tolist(), runs, strict=True):
                assert run.tolist() == sorted(new[c])
                old[c] |= new[c]
                new[c] = set()
        elif op[0] == "forget":
            slab.forget(np.array(op[1], np.intp), release=bool(op[2]))
            for c in op[1]:  # type: ignore[attr-defined]
                old[c], new[c] = set(), set()
        elif op[0] == "compact":
            slab.compact(force=bool(op[1]))
        else:
            more = int(op[1])  # type: ignore[call-overload]
            cells += more
            slab.grow(cells)
            old += [set() for _ in range(more)]
            new += [set() for _ in range(more)]
        check(slab, old, new)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=12), st.integers(1, 9))
def test_gather_ranges_in_steps_of_any_size(lengths: list[int], chunk: int) -> None:
    src = np.arange(1000, dtype=np.uint16)
    start = np.array([37 * i for i in range(len(lengths))], np.int64)
    length = np.array(lengths, np.int64)
    want = [v for s, k in zip(start.tolist(), lengths, strict=True) for v in range(s, s + k)]
    with mock.patch.object(slab_module, "_CHUNK", chunk):
        assert slab_module.gather_ranges(src, start, length).tolist() == want
