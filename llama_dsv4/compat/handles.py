"""The handles of the low-level API: the integers llama-cpp-python's ctypes functions hand out as pointers
(`llama_model_p`, `llama_vocab_p`, `llama_context_p`, `llama_memory_t`, `llama_sampler_p`), mapped here to the
Python objects behind them.

A handle is a plain int, as a `c_void_p` result is in ctypes, so callers can compare it, test it for None and pass
it to code that wants an address (llguidance's `lltokenizer_from_vocab` hands the vocab to our C tokenize callback).
It is never dereferenced: a handle that is not live (freed, its Llama closed, or an integer we did not make) is a
ValueError naming it, where llama.cpp would crash.

Two kinds of entries: the handles of a `Llama` (`Llama.model`, `Llama.ctx` and what derives from them), which live
as long as that Llama and do not keep it alive; and those the low-level API creates (`llama_model_load_from_file`,
`llama_init_from_model`, samplers), which hold their object until the matching free.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

_BASE, _STEP = 0x7D54_0000_0000, 0x40  # pointer-looking values, never 0

KIND_NAMES = {
    "model": "llama_model_p",
    "vocab": "llama_vocab_p",
    "context": "llama_context_p",
    "memory": "llama_memory_t",
    "sampler": "llama_sampler_p",
}


class Entry:
    """What a handle stands for: its kind, its object, and per-handle state of the low-level API."""

    __slots__ = ("__weakref__", "_strong", "_weak", "kind", "model", "state")

    def __init__(self, kind: str, target: Any, owned: bool, model: int | None = None) -> None:
        self.kind = kind
        self.model = model  # a context made by llama_init_from_model: the model handle it came from
        self.state: Any = None
        self._strong = target if owned else None
        self._weak = None if owned else weakref.ref(target)

    @property
    def owned(self) -> bool:
        return self._strong is not None

    def target(self) -> Any:
        return self._strong if self._weak is None else self._weak()


_lock = threading.RLock()  # reentrant: a finalizer (_forget) may run in a collection inside a locked block
_entries: dict[int, Entry] = {}
_counter = itertools.count(1)
_of: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def _new_handle(entry: Entry) -> int:
    h = _BASE + _STEP * next(_counter)
    _entries[h] = entry
    return h


def _forget(handles: dict[str, int]) -> None:
    with _lock:
        for h in handles.values():
            _entries.pop(h, None)


def handle_of(obj: Any, kind: str) -> int:
    """The handle of `kind` for `obj` (a Llama): the same integer every time, valid while `obj` lives."""
    with _lock:
        mine = _of.get(obj)
        if mine is None:
            mine = _of[obj] = {}
            weakref.finalize(obj, _forget, mine)
        h = mine.get(kind)
        if h is None:
            h = mine[kind] = _new_handle(Entry(kind, obj, owned=False))
        return h


def register(obj: Any, kind: str, model: int | None = None) -> int:
    """A new handle that holds `obj` until `release`."""
    with _lock:
        return _new_handle(Entry(kind, obj, owned=True, model=model))


def release(h: Any, kinds: tuple[str, ...]) -> Any:
    """End an owned handle (llama_model_free, llama_free, llama_sampler_free); returns its object."""
    entry, obj = resolve(h, kinds)
    if not entry.owned:
        raise ValueError(
            f"{KIND_NAMES[entry.kind]} {int(h):#x} belongs to a Llama; close the Llama instead of freeing its handle"
        )
    with _lock:
        _entries.pop(int(h), None)
    return obj


def as_int(h: Any, what: str) -> int:
    """The integer value of a handle argument (an int, or a ctypes c_void_p as some callers pass)."""
    value = getattr(h, "value", h)
    if value is None or value == 0:
        raise ValueError(f"{what} is NULL")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be a handle (int) from llama-dsv4's low-level API, got {type(h).__name__}")
    return value


def resolve(h: Any, kinds: tuple[str, ...]) -> tuple[Entry, Any]:
    """(entry, object) of a live handle of one of `kinds`; ValueError or TypeError otherwise."""
    want = " or ".join(KIND_NAMES[k] for k in kinds)
    value = as_int(h, want)
    with _lock:
        entry = _entries.get(value)
    if entry is None:
        raise ValueError(f"{value:#x} is not a live {want} (freed, or not made by llama-dsv4)")
    if entry.kind not in kinds:
        raise TypeError(f"expected a {want}, got a {KIND_NAMES[entry.kind]} ({value:#x})")
    obj = entry.target()
    if obj is None or getattr(obj, "_closed", False):
        raise ValueError(f"{KIND_NAMES[entry.kind]} {value:#x} has been freed (its Llama was closed)")
    return entry, obj
