"""Binary COPY data from numpy columns equals the format written out value by value, as the
PostgreSQL documentation describes it ("COPY", binary format)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.checkpoint.pgcopy import HEADER, TRAILER, TextFields, copy_data

_PACK = {"int4": ">ii", "int8": ">iq", "float8": ">id"}
_SIZE = {"int4": 4, "int8": 8, "float8": 8}
_DTYPE = {"int4": np.int32, "int8": np.int64, "float8": np.float64}


def reference(rows: list[tuple[object, ...]], kinds: list[str]) -> bytes:
    """The obvious encoder: signature, then per row a field count and every field as
    length + big-endian bytes (text as UTF-8, bytea as is), then -1."""
    out = bytearray(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
    for row in rows:
        out += struct.pack(">h", len(row))
        for value, kind in zip(row, kinds, strict=True):
            if kind in ("text", "bytea"):
                raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
                out += struct.pack(">i", len(raw)) + raw
            else:
                out += struct.pack(_PACK[kind], _SIZE[kind], value)
    return bytes(out + struct.pack(">h", -1))


values = {
    "int4": st.integers(-(2**31), 2**31 - 1),
    "int8": st.integers(-(2**63), 2**63 - 1),
    "float8": st.floats(allow_nan=False),
}
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@settings(deadline=None, max_examples=200)
@given(data=st.data(), fixed=st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=8),
       n_text=st.integers(0, 2), n_blob=st.integers(0, 1), n=st.integers(0, 20),
       chunk=st.integers(1, 8))
def test_copy_data_equals_the_reference_encoding(data: st.DataObject, fixed: list[str],
                                                 n_text: int, n_blob: int, n: int,
                                                 chunk: int) -> None:
    """Any columns, and any of their rows in any order (``rows``), chunked any way."""
    pool = data.draw(st.lists(names, min_size=1, max_size=6))
    columns = [data.draw(st.lists(values[k], min_size=n, max_size=n)) for k in fixed]
    slots = [data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
             for _ in range(n_text)]
    blobs = [data.draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
             for _ in range(n_blob)]
    picked = data.draw(st.none() | st.lists(st.integers(0, n - 1), max_size=2 * n)) if n else None
    fields = TextFields(pool).fields()
    encoded = copy_data(
        [(f"f{j}", np.array(c, _DTYPE[k]))
         for j, (c, k) in enumerate(zip(columns, fixed, strict=True))],
        [(f"t{j}", np.array(s, np.int32), fields) for j, s in enumerate(slots)],
        rows_per_chunk=chunk,
        blobs=[(f"b{j}", b"".join(b), np.cumsum([0, *map(len, b)]).astype(np.int64))
               for j, b in enumerate(blobs)],
        rows=None if picked is None else np.array(picked, np.intp))
    order = range(n) if picked is None else picked
    chunks = list(encoded.chunks)
    assert len(chunks) == 2 + -(-len(order) // chunk)  # header, the row chunks, trailer
    got = b"".join(chunks)
    rows = [tuple([*(c[i] for c in columns), *(pool[s[i]] for s in slots),
                   *(b[i] for b in blobs)]) for i in order]
    assert got == reference(rows, [*fixed, *["text"] * n_text, *["bytea"] * n_blob])
    assert got.startswith(HEADER) and got.endswith(TRAILER)


def test_text_fields_encode_names_added_later() -> None:
    names = ["a"]
    text = TextFields(names)
    assert text.fields() == [b"\x00\x00\x00\x01a"]
    names.append("zé")
    assert text.fields() == [b"\x00\x00\x00\x01a", b"\x00\x00\x00\x03z\xc3\xa9"]


def test_copy_data_refuses_a_column_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="column 0"):
        copy_data([("0", np.zeros(2, np.int16))], [])
