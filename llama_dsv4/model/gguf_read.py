"""A hardened GGUF header reader: key/value metadata and tensor infos, every length and offset checked.

It reads from any buffer (an mmap of the file); tensor data is not touched. Every malformed input raises
`GGUFError` (a ValueError) that names the file and what is wrong, before anything is allocated from an
unchecked size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _ggml
from .gguf_format import (
    DEFAULT_ALIGNMENT,
    MAGIC,
    MAX_DIMS,
    MAX_NAME_BYTES,
    NUMPY_DTYPE,
    SCALAR_FORMAT,
    SCALAR_SIZE,
    ValueType,
)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64_MAX = 2**63 - 1


class GGUFError(ValueError):
    """A GGUF file is malformed or is not a valid model of the expected kind."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous dimension
    type: int  # ggml type id
    offset: int  # absolute byte offset of the data in its file
    nbytes: int
    shard: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


@dataclass(frozen=True)
class KVType:
    type: ValueType
    elem: ValueType | None = None  # for arrays

    def __str__(self) -> str:
        if self.type == ValueType.ARRAY:
            return f"array of {_type_name(self.elem)}"
        return _type_name(self.type)


def _type_name(t: ValueType | None) -> str:
    return "?" if t is None else t.name.lower()


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    kv: dict[str, Any]  # scalars as Python values, numeric arrays as numpy arrays, string arrays as lists
    kv_types: dict[str, KVType]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    file_size: int


def type_sizes(type_id: int) -> tuple[str, int, int] | None:
    """(name, block size, bytes per block) of a ggml type id, or None if ggml does not know it."""
    if not 0 <= type_id < _ggml.GGML_TYPE_COUNT:  # a u32 from the file: C's int cannot even hold every value
        return None
    tr = _ggml.type_traits(type_id)
    return None if tr is None else (tr[0], tr[1], tr[2])


def _describe(t: TensorInfo) -> str:
    sizes = type_sizes(t.type)
    return f"tensor {t.name!r} ({sizes[0] if sizes else t.type}, shape {list(t.ne)})"


def _check_layout(c: _Cursor, tensors: list[TensorInfo], data_start: int, alignment: int) -> None:
    """Each tensor's data takes exactly the bytes its type needs for its shape, padded to the alignment, one after
    the other in the order of the tensor infos (llama.cpp's reader refuses any other layout): a stored size that
    differs from what the type and shape need shows as the next tensor's offset."""
    expected = 0
    for i, t in enumerate(tensors):
        rel = t.offset - data_start
        if rel != expected and i == 0:
            raise c.fail(f"{_describe(t)}, the first tensor, has its data at offset {rel}, expected 0")
        if rel < expected:
            raise c.fail(
                f"{_describe(t)} has its data at offset {rel}, inside the {tensors[i - 1].nbytes} bytes that "
                f"{_describe(tensors[i - 1])} needs: the tensors overlap"
            )
        if rel > expected:
            raise c.fail(
                f"{_describe(t)} has its data at offset {rel}, but {_describe(tensors[i - 1])} needs "
                f"{tensors[i - 1].nbytes} bytes, ending at {expected} (padded to {alignment}): the bytes the file "
                f"gives a tensor must be exactly what its type and shape need"
            )
        expected += -(-t.nbytes // alignment) * alignment


class _Cursor:
    def __init__(self, buf: Any, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, file has {self.size}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def string(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def scalar(self, t: ValueType, what: str) -> Any:
        n = SCALAR_SIZE[t]
        self.need(n, what)
        (v,) = struct.unpack_from(SCALAR_FORMAT[t], self.buf, self.pos)
        self.pos += n
        if t == ValueType.BOOL and self.buf[self.pos - 1] > 1:
            raise self.fail(f"{what}: boolean byte {self.buf[self.pos - 1]} is neither 0 nor 1")
        return v

    def value_type(self, what: str) -> ValueType:
        t = self.u32(f"type of {what}")
        try:
            return ValueType(t)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {t}") from None


def _read_value(c: _Cursor, key: str) -> tuple[Any, KVType]:
    t = c.value_type(f"key {key!r}")
    if t == ValueType.STRING:
        return c.string(f"value of {key!r}"), KVType(t)
    if t != ValueType.ARRAY:
        return c.scalar(t, f"value of {key!r}"), KVType(t)
    et = c.value_type(f"elements of array {key!r}")
    n = c.u64(f"length of array {key!r}")
    if et == ValueType.ARRAY:
        raise c.fail(f"key {key!r}: nested arrays are not supported")
    if et == ValueType.STRING:
        # each string needs at least its 8-byte length: bound the count before looping
        c.need(n * 8, f"{n} strings of array {key!r}")
        out, end, why = _ggml.read_strings(c.buf, c.pos, n)  # the loop in C: 257k strings in a DeepSeek V4 header
        if why == "truncated":
            raise c.fail(f"truncated: string {end} of array {key!r}")
        if why == "utf-8":
            raise c.fail(f"string {end} of array {key!r} is not valid UTF-8")
        if why is not None:
            raise c.fail(f"truncated: string {end} of array {key!r} claims {why[1]} bytes")
        c.pos = end
        return out, KVType(t, et)
    esz = SCALAR_SIZE[et]
    c.need(n * esz, f"{n} elements of array {key!r}")
    arr = np.frombuffer(c.buf, dtype=NUMPY_DTYPE[et], count=n, offset=c.pos).copy()
    c.pos += n * esz
    if et == ValueType.BOOL:
        if arr.size and arr.max() > 1:
            raise c.fail(f"array {key!r} holds a boolean that is neither 0 nor 1")
        arr = arr.astype(bool)
    return arr, KVType(t, et)


def read_header(buf: Any, path: str) -> GGUFHeader:
    """Parse and check the header of one GGUF file held in `buf` (bytes-like, e.g. an mmap)."""
    c = _Cursor(buf, path)
    if c.size < 24:
        raise c.fail(f"too small to be a GGUF file ({c.size} bytes)")
    if bytes(buf[:4]) != MAGIC:
        raise c.fail(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise c.fail(f"unsupported GGUF version {version}{hint}; versions 2 and 3 are read")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("key/value count")
    # a key/value pair takes at least 8+1+4+1 bytes, a tensor info 8+1+4+8+4+8: bound the counts by the file
    if n_kv * 14 > c.size or n_tensors * 33 > c.size:
        raise c.fail(f"implausible counts ({n_kv} keys, {n_tensors} tensors) for a {c.size}-byte file")

    kv: dict[str, Any] = {}
    kv_types: dict[str, KVType] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        if not key:
            raise c.fail(f"key {i} is empty")
        if key in kv:
            raise c.fail(f"duplicate key {key!r}")
        kv[key], kv_types[key] = _read_value(c, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        if kv_types["general.alignment"].type != ValueType.UINT32:
            raise c.fail(f"key 'general.alignment' must be u32, found {kv_types['general.alignment']}")
        alignment = int(kv["general.alignment"])
        if alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise c.fail(f"general.alignment {alignment} is not a power of two in [1, 2^20]")

    infos = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            raise c.fail(f"tensor {i}: name {name[:80]!r} is empty or longer than {MAX_NAME_BYTES} bytes")
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        type_id = c.u32(f"type of tensor {name!r}")
        rel = c.u64(f"offset of tensor {name!r}")
        infos.append((name, ne, type_id, rel))
    data_start = -(-c.pos // alignment) * alignment
    if data_start > c.size:
        raise c.fail(f"truncated: tensor data would start at {data_start}, file has {c.size} bytes")

    tensors = []
    seen: set[str] = set()
    for name, ne, type_id, rel in infos:
        if name in seen:
            raise c.fail(f"duplicate tensor {name!r}")
        seen.add(name)
        sizes = type_sizes(type_id)
        if sizes is None:
            raise c.fail(f"tensor {name!r} has unknown ggml type {type_id}")
        tname, blck, tsize = sizes
        n = 1
        for d in ne:
            if d <= 0:
                raise c.fail(f"tensor {name!r}: dimension {d} in shape {list(ne)} is not positive")
            n *= d
            if n > _I64_MAX:
                raise c.fail(f"tensor {name!r}: shape {list(ne)} overflows 64-bit element counts")
        if ne[0] % blck:
            raise c.fail(
                f"tensor {name!r} ({tname}, shape {list(ne)}): its row length {ne[0]} is not a multiple of the "
                f"{tname} block size {blck}"
            )
        nbytes = n // blck * tsize
        if rel % alignment:
            raise c.fail(f"tensor {name!r}: data offset {rel} is not aligned to {alignment}")
        start = data_start + rel
        if start + nbytes > c.size:
            raise c.fail(
                f"tensor {name!r}: data [{start}, {start + nbytes}) extends past the end of the file ({c.size} bytes)"
            )
        tensors.append(TensorInfo(name, ne, type_id, start, nbytes))

    _check_layout(c, tensors, data_start, alignment)
    return GGUFHeader(path, version, kv, kv_types, tensors, alignment, data_start, c.size)
