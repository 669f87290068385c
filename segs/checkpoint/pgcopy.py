"""PostgreSQL binary ``COPY`` data made from numpy columns, with no Python call per value.

Formatting a checkpoint's rows through psycopg's ``write_row`` costs Python work per value
(a tuple per row, a dumper per value), which transactions written side by side share under
the GIL. Here the fixed-width columns become one numpy record array (big-endian, each value
behind its 4-byte length, as the binary format wants), strings come from a per-slot cache of
encoded fields, and the rows are joined a chunk at a time while COPY sends them.

Layout (PostgreSQL docs, "COPY", binary format): signature, flags and header extension
length; per row an int16 field count, then per field an int32 byte length and the bytes;
an int16 -1 at the end. Fixed-width columns come first in each row and text columns after
them; :class:`CopyData` carries the column names in that order for the ``COPY`` statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import CompactInterner, Interner

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags 0, no header extension
TRAILER = b"\xff\xff"
CHUNK_ROWS = 16_384  # rows encoded at a time: about 2 MB of data for checkpoint rows


class TextFields:
    """The strings of an interner's name list, each kept encoded as one binary COPY field:
    4-byte big-endian length, then UTF-8. ``reused`` (:meth:`Interner.take_reused`) names
    the slots whose name changed since it was last asked; without it names only append.
    ``encoded``: fields already kept by the interner (``CompactInterner.fields``, made
    when read), returned as they are; nothing is cached here then."""

    def __init__(self, names: Sequence[str], reused: Callable[[], list[int]] | None = None,
                 *, encoded: Sequence[bytes] | None = None) -> None:
        self._names = names
        self._reused = reused
        self._encoded = encoded
        self._fields: list[bytes] = []

    @classmethod
    def of(cls, interner: Interner) -> TextFields:
        """The fields of ``interner``'s names: its own when it keeps them (compact), else
        cached here."""
        if isinstance(interner, CompactInterner):
            return cls(interner.names, interner.take_reused, encoded=interner.fields)
        return cls(interner.names, interner.take_reused)

    def fields(self) -> Sequence[bytes]:
        """Encoded fields by slot, encoding only names added or changed since the last call.
        A field of a slot in no payload may change later: a cut reads only its own slots."""
        if self._encoded is not None:
            if self._reused is not None:
                self._reused()  # taken all the same: the interner keeps them until asked
            return self._encoded
        fields, names = self._fields, self._names
        if self._reused is not None:
            for s in self._reused():
                if s < len(fields):
                    fields[s] = _field(names[s])
        for name in names[len(fields):]:
            fields.append(_field(name))
        return fields

    def release(self, slots: NDArray[np.integer]) -> None:
        """Drop the encoded names of released slots (their memory; the slot stays)."""
        fields = self._fields
        if not fields:  # nothing cached (the interner keeps its own fields)
            return
        for s in slots.tolist():
            if s < len(fields):
                fields[s] = _EMPTY


_EMPTY = (0).to_bytes(4, "big")


def _field(name: str) -> bytes:
    raw = name.encode()
    return len(raw).to_bytes(4, "big") + raw


@dataclass(frozen=True, slots=True)
class CopyData:
    """Binary COPY data for one table, made chunk by chunk while it is sent, and the names
    of its columns in the order of the data."""

    columns: tuple[str, ...]
    chunks: Iterable[bytes]


FixedColumn = tuple[str, NDArray[np.generic]]  # (name, int4/int8/float8 values)
TextColumn = tuple[str, NDArray[np.integer], Sequence[bytes]]  # (name, slots, fields by slot)
# (name, every row's bytes one after the other, row i's bytes at bounds[i]:bounds[i + 1])
BytesColumn = tuple[str, bytes, NDArray[np.int64]]


def copy_data(fixed: Sequence[FixedColumn], texts: Sequence[TextColumn],
              rows_per_chunk: int = CHUNK_ROWS,
              blobs: Sequence[BytesColumn] = (),
              rows: NDArray[np.intp] | None = None) -> CopyData:
    """Binary COPY data of ``len(fixed[0])`` rows: the ``fixed`` columns (int4, int8 or
    float8 arrays, in column order), then the ``texts`` columns, each given as slots and the
    encoded fields by slot from :meth:`TextFields.fields`, then the ``blobs`` (bytea).
    Encoded lazily, a chunk of ``rows_per_chunk`` rows at a time, so memory stays small for
    a million rows. ``rows``: only those rows of the columns, in that order, gathered chunk
    by chunk (no copy of the columns is held while the data waits to be sent)."""
    layout: list[tuple[str, str]] = [("n", ">i2")]
    for j, (name, col) in enumerate(fixed):
        if col.dtype.kind not in "if" or col.dtype.itemsize not in (4, 8):
            raise TypeError(f"column {name}: {col.dtype} is not int4, int8 or float8")
        layout += [(f"len{j}", ">i4"), (f"val{j}", col.dtype.newbyteorder(">").str)]
    columns = (tuple(name for name, _ in fixed) + tuple(name for name, _, _ in texts)
               + tuple(name for name, _, _ in blobs))
    return CopyData(columns, _chunks(np.dtype(layout), [col for _, col in fixed],
                                     [(slots, fields) for _, slots, fields in texts],
                                     rows_per_chunk, [(data, b) for _, data, b in blobs], rows))


def _chunks(layout: np.dtype[np.void], fixed: Sequence[NDArray[np.generic]],
            texts: Sequence[tuple[NDArray[np.integer], Sequence[bytes]]],
            rows_per_chunk: int,
            blobs: Sequence[tuple[bytes, NDArray[np.int64]]] = (),
            rows: NDArray[np.intp] | None = None) -> Iterator[bytes]:
    yield HEADER
    n = len(fixed[0]) if rows is None else len(rows)
    step = 1 + len(texts) + 2 * len(blobs)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        at: slice | NDArray[np.intp]
        after: slice | NDArray[np.intp]  # row i's end bound, for the blobs
        if rows is None:
            at, after = slice(start, stop), slice(start + 1, stop + 1)
        else:
            at = rows[start:stop]
            after = at + 1
        rec = np.empty(stop - start, layout)
        rec["n"] = len(fixed) + len(texts) + len(blobs)
        for j, col in enumerate(fixed):
            rec[f"len{j}"] = col.dtype.itemsize
            rec[f"val{j}"] = col[at]
        raw, width = rec.tobytes(), layout.itemsize
        pieces: list[bytes] = [b""] * (len(rec) * step)
        pieces[0::step] = [raw[i:i + width] for i in range(0, len(raw), width)]
        for k, (slots, fields) in enumerate(texts, 1):
            pieces[k::step] = list(map(fields.__getitem__, slots[at].tolist()))
        for k, (data, bounds) in enumerate(blobs, 1 + len(texts)):
            lo, hi = bounds[at], bounds[after]
            lengths = (hi - lo).astype(">i4").tobytes()
            pieces[k::step] = [lengths[i:i + 4] for i in range(0, len(lengths), 4)]
            pieces[k + 1::step] = [data[a:b] for a, b in zip(lo.tolist(), hi.tolist(),
                                                            strict=True)]
        yield b"".join(pieces)
    yield TRAILER
