"""A streaming GGUF v3 writer with llama.cpp-compatible splitting into shards.

Tensor data is produced one tensor at a time by a callback, so files larger than memory can be written.
Shards follow llama.cpp's gguf-split convention: `stem-0000i-of-0000N.gguf`, the model's key/value pairs in the
first shard only, and `split.no` (u16), `split.count` (u16), `split.tensors.count` (i32) in every shard.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gguf_format import (
    DEFAULT_ALIGNMENT,
    MAGIC,
    MAX_DIMS,
    MAX_NAME_BYTES,
    NUMPY_DTYPE,
    SCALAR_FORMAT,
    VERSION,
    ValueType,
    align,
    split_name,
)
from .gguf_read import type_sizes


@dataclass(frozen=True)
class KV:
    """One typed metadata entry. For arrays, `type` is ARRAY and `elem` the element type."""

    key: str
    type: ValueType
    value: Any
    elem: ValueType | None = None


def u32(key: str, v: int) -> KV:
    return KV(key, ValueType.UINT32, int(v))


def i32(key: str, v: int) -> KV:
    return KV(key, ValueType.INT32, int(v))


def f32(key: str, v: float) -> KV:
    return KV(key, ValueType.FLOAT32, float(v))


def boolean(key: str, v: bool) -> KV:
    return KV(key, ValueType.BOOL, bool(v))


def string(key: str, v: str) -> KV:
    return KV(key, ValueType.STRING, str(v))


def array(key: str, elem: ValueType, values: Sequence[Any]) -> KV:
    return KV(key, ValueType.ARRAY, values, elem)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order
    type: int  # ggml type id

    @property
    def nbytes(self) -> int:
        sizes = type_sizes(self.type)
        if sizes is None:
            raise ValueError(f"tensor {self.name!r}: unknown ggml type {self.type}")
        _, blck, tsize = sizes
        n = int(np.prod(self.ne, dtype=object))
        if self.ne[0] % blck:
            raise ValueError(f"tensor {self.name!r}: ne0={self.ne[0]} is not a multiple of {blck}")
        return n // blck * tsize


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(t: ValueType, v: Any) -> bytes:
    if t == ValueType.STRING:
        return _pack_string(v)
    return struct.pack(SCALAR_FORMAT[t], v)


def _pack_kv(kv: KV) -> bytes:
    out = [_pack_string(kv.key), struct.pack("<I", kv.type)]
    if kv.type != ValueType.ARRAY:
        out.append(_pack_value(kv.type, kv.value))
        return b"".join(out)
    assert kv.elem is not None and kv.elem != ValueType.ARRAY
    out.append(struct.pack("<IQ", kv.elem, len(kv.value)))
    if kv.elem == ValueType.STRING:
        out.extend(_pack_string(s) for s in kv.value)
    else:
        out.append(np.asarray(kv.value).astype(NUMPY_DTYPE[kv.elem]).tobytes())
    return b"".join(out)


def _write_one(
    path: str,
    kvs: Sequence[KV],
    tensors: Sequence[TensorEntry],
    data: Callable[[TensorEntry], Any],
    alignment: int,
) -> None:
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(kvs))]
    header.extend(_pack_kv(kv) for kv in kvs)
    offset = 0
    for t in tensors:
        if not 0 < len(t.name.encode()) <= MAX_NAME_BYTES or not 1 <= len(t.ne) <= MAX_DIMS:
            raise ValueError(f"tensor {t.name!r}: bad name or shape {t.ne}")
        header.append(_pack_string(t.name))
        header.append(struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne))
        header.append(struct.pack("<IQ", t.type, offset))
        offset = align(offset + t.nbytes, alignment)
    head = b"".join(header)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(b"\0" * (align(len(head), alignment) - len(head)))
        for t in tensors:
            buf = memoryview(np.ascontiguousarray(data(t))).cast("B")
            if buf.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: data has {buf.nbytes} bytes, expected {t.nbytes}")
            f.write(buf)
            f.write(b"\0" * (align(t.nbytes, alignment) - t.nbytes))
    os.replace(tmp, path)


def write_gguf(
    path: str,
    kvs: Sequence[KV],
    tensors: Sequence[TensorEntry],
    data: Callable[[TensorEntry], Any],
    *,
    n_shards: int = 1,
    alignment: int = DEFAULT_ALIGNMENT,
) -> list[str]:
    """Write a model as one file (`path`) or as `n_shards` shards named after `path`; returns the paths.

    `data(entry)` returns the bytes of one tensor (any buffer: numpy array, bytes) in the entry's type.
    """
    if alignment != DEFAULT_ALIGNMENT:
        kvs = [*kvs, u32("general.alignment", alignment)]
    if n_shards <= 1:
        _write_one(path, kvs, tensors, data, alignment)
        return [path]
    if n_shards > len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {n_shards} shards")
    stem = path[:-5] if path.endswith(".gguf") else path
    per = -(-len(tensors) // n_shards)
    groups = [list(tensors[i * per : (i + 1) * per]) for i in range(n_shards)]
    if any(not grp for grp in groups):
        per, rem = divmod(len(tensors), n_shards)
        groups, start = [], 0
        for i in range(n_shards):
            size = per + (1 if i < rem else 0)
            groups.append(list(tensors[start : start + size]))
            start += size
    paths = []
    for i, grp in enumerate(groups):
        split_kv = [
            KV("split.no", ValueType.UINT16, i),
            KV("split.count", ValueType.UINT16, n_shards),
            i32("split.tensors.count", len(tensors)),
        ]
        shard_kvs = [*kvs, *split_kv] if i == 0 else split_kv
        if i > 0 and alignment != DEFAULT_ALIGNMENT:
            shard_kvs = [*shard_kvs, u32("general.alignment", alignment)]
        p = os.path.join(os.path.dirname(path), split_name(os.path.basename(stem), i, n_shards))
        _write_one(p, shard_kvs, grp, data, alignment)
        paths.append(p)
    return paths
