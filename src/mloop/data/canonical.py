"""The canonical Arrow form of a table and its digest.

A snapshot's identity must not depend on how the bytes happened to be laid out: the same table
read from CSV or Parquet, in one row group or fifty, hashes the same. So before hashing, types
are normalised (ints to int64, floats to float64, timestamps to microseconds, dictionaries and
string views decoded; numbers hash as one type, since CSV cannot tell 81 from 81.0) and each
column is hashed as a null mask plus its values with nulls zeroed, independent of chunking.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST_VERSION = "mloop-canonical-v1"
_BLOCK = 1 << 16


def _canonical_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return _canonical_type(t.value_type)
    if pa.types.is_integer(t):
        return pa.uint64() if t == pa.uint64() else pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view():
        return pa.string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or t == pa.binary_view():
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz=t.tz)
    if pa.types.is_date64(t):
        return pa.date32()
    return t


def canonicalize(table: pa.Table) -> pa.Table:
    """Return ``table`` with canonical column types (values unchanged), one chunk per column."""
    fields = []
    columns = []
    for field, col in zip(table.schema, table.columns, strict=True):
        target = _canonical_type(field.type)
        if pa.types.is_dictionary(field.type):
            col = col.cast(field.type.value_type)
        if col.type != target:
            try:
                col = col.cast(target)
            except pa.ArrowInvalid:
                # e.g. nanosecond timestamps that microseconds would truncate: keep them exact
                target = col.type
        fields.append(pa.field(field.name, target))
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields)).combine_chunks()


def _hash_column(col: pa.ChunkedArray, h: hashlib._Hash) -> None:
    t = col.type
    is_text = pa.types.is_string(t) or pa.types.is_binary(t)
    fixed = (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        or pa.types.is_temporal(t)
    )
    lengths = hashlib.sha256()
    for chunk in col.chunks:
        for start in range(0, len(chunk), _BLOCK):
            block = chunk.slice(start, _BLOCK)
            h.update(np.packbits(block.is_null().to_numpy(zero_copy_only=False)).tobytes())
            if pa.types.is_null(t):
                continue
            if fixed:
                if pa.types.is_temporal(t):
                    width = pa.int32() if t.bit_width == 32 else pa.int64()
                    block = block.view(width)
                zero = False if pa.types.is_boolean(t) else 0
                values = pc.fill_null(block, pa.scalar(zero, block.type))
                h.update(np.ascontiguousarray(values.to_numpy(zero_copy_only=False)).tobytes())
            elif is_text:
                b = pc.fill_null(block.cast(pa.large_binary()), b"")
                lengths.update(pc.binary_length(b).to_numpy(zero_copy_only=False).tobytes())
                offsets = np.frombuffer(b.buffers()[1], dtype=np.int64)
                lo, hi = offsets[b.offset], offsets[b.offset + len(b)]
                data = b.buffers()[2]
                if data is not None and hi > lo:
                    h.update(memoryview(data)[lo:hi])
            else:  # nested or exotic types: slow but canonical
                h.update(repr(block.to_pylist()).encode())
    if is_text:
        h.update(lengths.digest())


_EXACT_FLOAT = 2**53


def _hash_type(col: pa.ChunkedArray) -> tuple[str, pa.ChunkedArray]:
    """Integers hash as float64 when exact: CSV cannot tell 81 from 81.0, so a numeric column
    must hash the same whichever of the two a reader infers."""
    t = col.type
    if pa.types.is_integer(t) and len(col) > col.null_count:
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo >= -_EXACT_FLOAT and hi <= _EXACT_FLOAT:
            return "number", col.cast(pa.float64())
    if pa.types.is_integer(t) and len(col) == col.null_count:
        return "number", col.cast(pa.float64())
    if pa.types.is_floating(t):
        return "number", col
    return str(t), col


def table_digest(table: pa.Table) -> str:
    """sha256 over the canonical form: schema, row count, then each column's nulls and values."""
    table = canonicalize(table)
    outer = hashlib.sha256()
    outer.update(DIGEST_VERSION.encode())
    outer.update(str(table.num_rows).encode())
    for field, col in zip(table.schema, table.columns, strict=True):
        h = hashlib.sha256()
        type_name, col = _hash_type(col)
        h.update(f"{field.name}\x00{type_name}".encode())
        _hash_column(col, h)
        outer.update(h.digest())
    return outer.hexdigest()
