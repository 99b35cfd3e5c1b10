"""Residency of the expert weights in the mapped model file: lock the hot experts' pages, release the cold ones,
and read back what the kernel says (VmLck, mincore).

Ranges are page-aligned: a hot slice locks every page it touches; a page is unlocked and released only when no
hot slice (and, with use_mlock, no other weight) touches it. Updates are differential: only pages whose state
changes get a syscall, coalesced into runs.

Interval sets are sorted disjoint (starts, ends) arrays of page numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from dataclasses import dataclass

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim now (clean file pages leave the page cache)

Intervals = tuple[np.ndarray, np.ndarray]
EMPTY: Intervals = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def union(starts: np.ndarray, ends: np.ndarray) -> Intervals:
    """The interval set covering the ranges [starts[i], ends[i]) (empty ranges dropped, overlaps merged)."""
    keep = ends > starts
    s, e = np.asarray(starts, np.int64)[keep], np.asarray(ends, np.int64)[keep]
    if s.size == 0:
        return EMPTY
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    reach = np.maximum.accumulate(e)
    new = np.ones(s.size, bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, s.size - 1]
    return s[first], reach[last]


def _covered(iv: Intervals, points: np.ndarray) -> np.ndarray:
    s, e = iv
    if s.size == 0:
        return np.zeros(points.shape, bool)
    i = np.searchsorted(s, points, side="right") - 1
    return (i >= 0) & (points < e[np.maximum(i, 0)])


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """Pages in a and not in b."""
    if a[0].size == 0 or b[0].size == 0:
        return a
    cuts = np.unique(np.concatenate([a[0], a[1], b[0], b[1]]))
    lo, hi = cuts[:-1], cuts[1:]
    keep = _covered(a, lo) & ~_covered(b, lo)
    return union(lo[keep], hi[keep])


def total(iv: Intervals) -> int:
    """The number of pages in an interval set."""
    return int((iv[1] - iv[0]).sum())


@dataclass
class ExpertTensor:
    """One layer's expert tensor in the mapping: `nbytes` at `address`, one equal slice per expert."""

    layer: int
    address: int
    nbytes: int
    n_expert: int

    @property
    def slice_bytes(self) -> int:
        """The bytes of one expert's slice."""
        return self.nbytes // self.n_expert

    def pages(self, experts: np.ndarray) -> Intervals:
        """The pages touched by these experts' slices."""
        a = self.address + np.asarray(experts, np.int64) * self.slice_bytes
        return union(a // PAGE, (a + self.slice_bytes + PAGE - 1) // PAGE)


class Syscalls:
    """mlock / munlock / madvise / mincore through libc (Linux, macOS). Tests substitute a fake."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        for f in ("mlock", "munlock", "madvise"):
            getattr(self.libc, f).argtypes = [ctypes.c_void_p, ctypes.c_size_t] + (
                [ctypes.c_int] if f == "madvise" else []
            )
            getattr(self.libc, f).restype = ctypes.c_int
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.libc.mincore.restype = ctypes.c_int
        self.pageout = sys.platform.startswith("linux")

    def _call(self, f: str, *args: int) -> int:
        r = getattr(self.libc, f)(*args)
        return 0 if r == 0 else (ctypes.get_errno() or errno.EINVAL)

    def mlock(self, addr: int, n: int) -> int:
        """mlock(2): 0, or the errno."""
        return self._call("mlock", addr, n)

    def munlock(self, addr: int, n: int) -> int:
        """munlock(2): 0, or the errno."""
        return self._call("munlock", addr, n)

    def release(self, addr: int, n: int, fd: int = -1, offset: int = 0) -> int:
        """Give pages of a file mapping back: reclaim those this process maps (MADV_PAGEOUT, else unmap them with
        MADV_DONTNEED), then drop the file's cached pages of that range (posix_fadvise), which also covers pages
        that sit in the page cache without ever having been touched through this mapping."""
        if not (self.pageout and self._call("madvise", addr, n, MADV_PAGEOUT) == 0):
            err = self._call("madvise", addr, n, MADV_DONTNEED)
            if err:
                return err
        if fd >= 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                return e.errno or errno.EINVAL
        return 0

    RESIDENT_CHUNK = 1 << 18  # pages per mincore call: a 256 KiB vector, whatever the model's size

    def resident(self, addr: int, n: int) -> int:
        """Bytes of [addr, addr+n) (page-aligned) in memory, by mincore, a chunk at a time (the 184 GB model has
        45M pages: one vector for all of them would be a 45 MB allocation on every /metrics scrape)."""
        pages = (n + PAGE - 1) // PAGE
        vec = np.zeros(min(pages, self.RESIDENT_CHUNK), np.uint8)
        total = 0
        for p0 in range(0, pages, self.RESIDENT_CHUNK):
            k = min(self.RESIDENT_CHUNK, pages - p0)
            if self.libc.mincore(addr + p0 * PAGE, k * PAGE, vec.ctypes.data) != 0:
                return -1
            total += int(np.count_nonzero(vec[:k] & 1))
        return total * PAGE

    @staticmethod
    def locked_bytes() -> int | None:
        """VmLck of this process (the kernel's count of locked memory), None where /proc is absent."""
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmLck:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


class Residency:
    """The locked page set of the expert tensors (plus, with use_mlock, every other weight)."""

    def __init__(
        self,
        tensors: list[ExpertTensor],
        pinned: Intervals = EMPTY,
        sys_: Syscalls | None = None,
        files: list[tuple[int, int, int]] | None = None,
    ):
        self.tensors = tensors
        self.files = sorted(files or [])  # (mapping base address, length, fd) of the model's shards
        self.pinned = pinned  # pages that stay locked whatever the hot set (use_mlock's other weights)
        self.sys = sys_ or Syscalls()
        self.locked = EMPTY
        self.expert_pages = union(
            np.array([t.address // PAGE for t in tensors], np.int64),
            np.array([(t.address + t.nbytes + PAGE - 1) // PAGE for t in tensors], np.int64),
        )
        self.lock_failed_bytes = 0
        self.lock_errno = 0

    def hot_pages(self, hot_sets: list[np.ndarray]) -> Intervals:
        """The pages to keep locked: those of the hot experts' slices (per layer, `hot_sets`) and the pinned ones."""
        parts = [t.pages(hot_sets[t.layer]) for t in self.tensors] + [self.pinned]
        return union(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def apply(self, hot_sets: list[np.ndarray], release: bool = True) -> tuple[int, int]:
        """Make the locked set the pages of `hot_sets` (per layer, expert ids hottest first). Locks in order until
        one fails (the rest stay unlocked: a clean back-off; `lock_failed_bytes` says how much).
        Returns (bytes newly locked, bytes released)."""
        want = self.hot_pages(hot_sets)
        gone = subtract(self.locked, want)
        new = subtract(want, self.locked)
        self.lock_failed_bytes, self.lock_errno = 0, 0
        for s, e in zip(gone[0].tolist(), gone[1].tolist(), strict=True):  # unlock first: frees lock quota
            self.sys.munlock(s * PAGE, (e - s) * PAGE)
        kept = subtract(self.locked, gone)
        got = 0
        ok_s, ok_e = [], []
        for s, e in zip(new[0].tolist(), new[1].tolist(), strict=True):
            if self.lock_errno:
                self.lock_failed_bytes += (e - s) * PAGE
                continue
            err = self.sys.mlock(s * PAGE, (e - s) * PAGE)
            if err:
                self.lock_errno = err
                self.lock_failed_bytes += (e - s) * PAGE
                continue
            ok_s.append(s)
            ok_e.append(e)
            got += (e - s) * PAGE
        released = 0
        if release:  # every expert page no hot slice touches goes back to the kernel (cold experts read since the
            # last update included: the miss rate decides how many come back)
            drop = subtract(self.expert_pages, want)
            for s, e in zip(drop[0].tolist(), drop[1].tolist(), strict=True):
                if self._release(s * PAGE, (e - s) * PAGE) == 0:
                    released += (e - s) * PAGE
        self.locked = union(np.r_[kept[0], np.array(ok_s, np.int64)], np.r_[kept[1], np.array(ok_e, np.int64)])
        return got, released

    def release_cold(self, hot_sets: list[np.ndarray]) -> int:
        """Hand back every expert page no hot slice touches (at start-up: the cold experts)."""
        cold = subtract(self.expert_pages, self.hot_pages(hot_sets))
        n = 0
        for s, e in zip(cold[0].tolist(), cold[1].tolist(), strict=True):
            if self._release(s * PAGE, (e - s) * PAGE) == 0:
                n += (e - s) * PAGE
        return n

    def _release(self, addr: int, n: int) -> int:
        for base, length, fd in self.files:
            if base <= addr and addr + n <= base + length:
                return self.sys.release(addr, n, fd, addr - base)
        return self.sys.release(addr, n)

    def unlock_all(self) -> None:
        """Unlock every page this object locked."""
        for s, e in zip(self.locked[0].tolist(), self.locked[1].tolist(), strict=True):
            self.sys.munlock(s * PAGE, (e - s) * PAGE)
        self.locked = EMPTY

    @property
    def locked_bytes(self) -> int:
        """The bytes this object holds locked."""
        return total(self.locked) * PAGE

    def resident_bytes(self) -> int:
        """Bytes of the expert tensors in memory now (mincore over their pages)."""
        n = 0
        for s, e in zip(self.expert_pages[0].tolist(), self.expert_pages[1].tolist(), strict=True):
            r = self.sys.resident(s * PAGE, (e - s) * PAGE)
            if r < 0:
                return -1
            n += r
        return n
