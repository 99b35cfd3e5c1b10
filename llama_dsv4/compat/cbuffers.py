"""The buffers low-level callers pass where llama.cpp takes a C pointer: ctypes arrays and pointers, objects with a
writable buffer (bytearray, numpy arrays), or a raw address (an int, as a C caller such as llguidance's tokenizer
passes it).

Where the buffer's size is known (an array, a buffer object) a length beyond it is a ValueError instead of the
overrun llama.cpp would make; a raw pointer or address carries no size, and its length is trusted, as in C.
"""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Sequence
from typing import Any


def as_int(n: Any, what: str) -> int:
    """An integer argument: an int, a numpy integer or a ctypes integer (c_int, ...), as ctypes accepts them."""
    if isinstance(n, ctypes._SimpleCData):  # type: ignore[attr-defined]
        n = n.value
    if isinstance(n, bool) or n is None:
        raise TypeError(f"{what} must be an integer, got {type(n).__name__}")
    try:
        return operator.index(n)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(n).__name__}") from None


def _address_of_pointer(buf: Any, what: str) -> int:
    addr = ctypes.cast(buf, ctypes.c_void_p).value
    if not addr:
        raise ValueError(f"{what} is NULL")
    return addr


def _elem_size(buf: Any) -> int | None:
    t = getattr(type(buf), "_type_", None)
    return ctypes.sizeof(t) if isinstance(t, type) and issubclass(t, ctypes._SimpleCData) else None  # type: ignore[attr-defined]


def writable(buf: Any, length: int, itemsize: int, what: str) -> tuple[int, Any]:
    """(address, keep-alive object) of a buffer that may receive `length` items of `itemsize` bytes."""
    length = as_int(length, f"the length of {what}")
    if length < 0:
        raise ValueError(f"the length of {what} must be a non-negative integer, got {length!r}")
    if isinstance(buf, int) and not isinstance(buf, bool):
        if buf <= 0:
            raise ValueError(f"{what} is NULL")
        return buf, None
    if isinstance(buf, (bytes, str)):
        raise TypeError(f"{what} must be writable (e.g. ctypes.create_string_buffer(n)); got {type(buf).__name__}")
    if isinstance(buf, (ctypes._Pointer, ctypes.c_char_p, ctypes.c_void_p)):  # type: ignore[attr-defined]
        size = _elem_size(buf)
        if itemsize > 1 and size is not None and size != itemsize:
            raise TypeError(f"{what} must point to {itemsize}-byte items, got a pointer to {size}-byte items")
        return _address_of_pointer(buf, what), buf
    if isinstance(buf, ctypes.Array):
        size = _elem_size(buf)
        if itemsize > 1 and size is not None and size != itemsize:
            raise TypeError(f"{what} must hold {itemsize}-byte items (ctypes.c_int32), got {type(buf).__name__}")
        capacity = ctypes.sizeof(buf) // itemsize
        if length > capacity:
            raise ValueError(f"{what} holds {capacity} items, fewer than the length given ({length})")
        return ctypes.addressof(buf), buf
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(
            f"{what} must be a ctypes array or pointer or a writable buffer, got {type(buf).__name__}"
        ) from None
    if view.readonly or not view.c_contiguous:
        raise TypeError(f"{what} must be a writable, contiguous buffer")
    if itemsize > 1 and view.itemsize != itemsize:
        raise TypeError(f"{what} must hold {itemsize}-byte items, got {view.itemsize}-byte items")
    if length > view.nbytes // itemsize:
        raise ValueError(f"{what} holds {view.nbytes // itemsize} items, fewer than the length given ({length})")
    if view.nbytes == 0:
        return 0, None
    arr = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(arr), arr


def check_writable(buf: Any, length: int, itemsize: int, what: str) -> None:
    """Check a buffer before the work whose result goes into it (with length 0 nothing is written: any buffer,
    NULL included, is fine)."""
    if length > 0:
        writable(buf, length, itemsize, what)


def write_bytes(buf: Any, length: int, data: bytes, what: str) -> None:
    """Copy `data` (at most `length` bytes, checked by the caller) into `buf`."""
    if data:
        addr, keep = writable(buf, length, 1, what)
        ctypes.memmove(addr, data, len(data))
        del keep


def write_int32(buf: Any, length: int, values: Sequence[int], what: str) -> None:
    if len(values):
        addr, keep = writable(buf, length, 4, what)
        arr = (ctypes.c_int32 * len(values))(*values)
        ctypes.memmove(addr, arr, ctypes.sizeof(arr))
        del keep


def _check_count(n: Any, what: str) -> int:
    n = as_int(n, what)
    if n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")
    return n


def read_bytes(src: Any, n: Any, what: str) -> bytes:
    """The first `n` bytes of `src` (bytes-like, a ctypes char array or pointer, or an address)."""
    n = _check_count(n, f"the length of {what}")
    if isinstance(src, str):
        raise TypeError(f"{what} must be bytes (encode the text as UTF-8), got str")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if n > len(data):
            raise ValueError(f"the length of {what} ({n}) is beyond its {len(data)} bytes")
        return data[:n]
    if n == 0:
        return b""
    if isinstance(src, int) and not isinstance(src, bool):
        if src <= 0:
            raise ValueError(f"{what} is NULL")
        return ctypes.string_at(src, n)
    if isinstance(src, ctypes.Array):
        if n > ctypes.sizeof(src):
            raise ValueError(f"the length of {what} ({n}) is beyond its {ctypes.sizeof(src)} bytes")
        return ctypes.string_at(ctypes.addressof(src), n)
    if isinstance(src, (ctypes._Pointer, ctypes.c_char_p, ctypes.c_void_p)):  # type: ignore[attr-defined]
        return ctypes.string_at(_address_of_pointer(src, what), n)
    raise TypeError(f"{what} must be bytes or a ctypes char buffer, got {type(src).__name__}")


def read_int32(src: Any, n: Any, what: str) -> list[int]:
    """The first `n` int32 values of `src` (a ctypes array or pointer, a sequence of ints, or a buffer)."""
    n = _check_count(n, f"the count of {what}")
    if n == 0:
        return []
    if isinstance(src, (ctypes._Pointer, ctypes.c_void_p)) or (isinstance(src, int) and not isinstance(src, bool)):  # type: ignore[attr-defined]
        addr = src if isinstance(src, int) else _address_of_pointer(src, what)
        if addr <= 0:
            raise ValueError(f"{what} is NULL")
        return list((ctypes.c_int32 * n).from_address(addr))
    if isinstance(src, ctypes.Array):
        size = _elem_size(src)
        if size is not None and size != 4:
            raise TypeError(f"{what} must hold 4-byte items (ctypes.c_int32), got {type(src).__name__}")
    if not hasattr(src, "__len__"):
        raise TypeError(
            f"{what} must be a ctypes int32 array or pointer or a sequence of ints, got {type(src).__name__}"
        )
    if n > len(src):
        raise ValueError(f"the count of {what} ({n}) is beyond its {len(src)} items")
    return [int(v) for v in src[:n]]
