"""The compact meter-id interner against the dict one: the same slots, names, reuse and
fields for any sequence of look-ups, new names and releases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.checkpoint.pgcopy import TextFields
from segs.intake.readings import CompactInterner, Interner, meter_interner

pytestmark = pytest.mark.skipif(type(meter_interner()) is Interner,
                                reason="native extension not built: no compact interner")

NAMES = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
OPS = st.lists(st.one_of(
    st.tuples(st.just("slot"), st.lists(NAMES, max_size=20)),
    st.tuples(st.just("get"), st.lists(NAMES, max_size=10)),
    st.tuples(st.just("release"), st.lists(st.integers(0, 10**6), max_size=10)),
    st.tuples(st.just("reused"), st.just([])),
), max_size=30)


def same(a: Interner, b: Interner) -> None:
    assert len(a) == len(b) and a.held() == b.held()
    assert list(a.names) == list(b.names)
    assert a.in_use().tolist() == b.in_use().tolist()


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_compact_interner_is_the_dict_interner(ops: list[tuple[str, list[object]]]) -> None:
    ref, got = Interner(), CompactInterner()
    ref_fields = TextFields(ref.names, ref.take_reused)
    for op, args in ops:
        if op == "slot":
            assert [got.slot(str(n)) for n in args] == [ref.slot(str(n)) for n in args]
        elif op == "get":
            for n in map(str, args):
                assert got.get(n) == ref.get(n) and (n in got) == (n in ref)
        elif op == "release":
            held = np.flatnonzero(ref.in_use())
            pick = sorted({held[int(k) % held.size] for k in args}) if held.size else []
            slots = np.array(pick, np.int64)
            ref.release(slots)
            got.release(slots)
        else:
            assert got.take_reused() == ref.take_reused()
        same(ref, got)
    assert list(got.fields) == list(ref_fields.fields())


def test_many_names_grow_the_table_and_compact_the_buffer() -> None:
    """Enough names to resize the table several times, and releases enough to compact."""
    got = CompactInterner()
    names = [f"MTR-{i:07d}" for i in range(200_000)]
    assert [got.slot(n) for n in names] == list(range(len(names)))
    before = got.nbytes()
    gone = np.flatnonzero(np.arange(200_000) % 4 != 3)
    got.release(gone)
    assert got.held() == 50_000 and got.get(names[0]) == -1 and got.get(names[3]) == 3
    assert got.nbytes() < before  # the dead three quarters of the buffer compacted away
    assert [got.slot(f"NEW-{i}") for i in range(4)] == [0, 1, 2, 4]  # the lowest free first
    assert all(got.get(n) == (i if i % 4 == 3 else -1) for i, n in enumerate(names))
    assert [got.names[i] for i in range(6)] == ["NEW-0", "NEW-1", "NEW-2", names[3], "NEW-3",
                                                ""]


def test_bad_names_and_slots_are_refused() -> None:
    got = CompactInterner()
    got.slot("a")
    assert got.get("\ud800") == -1 and "\ud800" not in got  # no UTF-8: never held
    with pytest.raises(ValueError):
        got.slot("\ud800")
    with pytest.raises(ValueError):
        got.release(np.array([5]))
    with pytest.raises(IndexError):
        got.names[3]
    assert got.held() == 1 and got.names[0] == "a" and got.fields[0] == b"\x00\x00\x00\x01a"


def test_a_release_is_all_or_nothing() -> None:
    got = CompactInterner()
    for n in "abc":
        got.slot(n)
    with pytest.raises(ValueError, match="given twice"):
        got.release(np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="holds no name"):
        got.release(np.array([2, 7]))
    assert got.held() == 3 and list(got.names) == ["a", "b", "c"]


def test_slots_that_run_python_code_cannot_corrupt_the_arena() -> None:
    """``release`` converts every slot before it checks any: an ``__index__`` that changes
    its answer, or the arena, is judged by what it returned."""
    arena = CompactInterner()._arena

    class Shifty:
        calls = 0

        def __index__(self) -> int:
            Shifty.calls += 1
            if Shifty.calls == 1:
                arena.release([0])  # the slot this one names is gone before the check
            return 0

    arena.slot("x")
    with pytest.raises(ValueError, match="holds no name"):
        arena.release([Shifty()])
    assert arena.held() == 0 and arena.free_slots() == [0]


def test_reused_slots_are_taken_by_the_fields_so_they_do_not_pile_up() -> None:
    got = CompactInterner()
    fields = TextFields.of(got)
    for i in range(1_000):
        got.release(np.array([got.slot(f"m{i}")]))
        assert fields.fields()[0] == b"\x00\x00\x00\x00"
    assert got.take_reused() == []
