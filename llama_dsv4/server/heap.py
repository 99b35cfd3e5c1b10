"""Giving freed heap memory back to the OS after a large request.

glibc's malloc keeps what a big request freed (its request body, prompt, token lists) inside the process: it raises
its mmap threshold after freeing a large block, so the next big blocks come from the heap, and it trims the heap
only past a threshold that grows with it. `malloc_trim(0)` hands every free page back (elsewhere, musl or macOS,
that step is skipped). Before it, a garbage collection frees what reference cycles still hold: an exception that
refused a request keeps the frames that held its body until the collector runs.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable

BIG_BODY = 1 << 20  # a request body at least this large is followed by give_back()
DELAY_S = 0.5  # ... this long after the request (once for a burst of them)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_TRIM = _malloc_trim()
_busy = threading.Lock()


def give_back() -> bool:
    """Collect garbage, then return the free pages of every malloc arena to the OS (False where that is not
    available, or while another thread is doing it)."""
    if not _busy.acquire(blocking=False):
        return False
    try:
        gc.collect()
        if _TRIM is None:
            return False
        _TRIM(0)
        return True
    finally:
        _busy.release()
