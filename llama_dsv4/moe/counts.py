"""Exact routing statistics: every routed (token, layer, expert), hash layers included.

Two matrices [n_layer, n_expert]: lifetime counts (u64, never decay) and decayed counts (f64, halved every
`half_life` counted tokens), which rank the experts so that the hot set follows what the model is doing now.
The online hit rate is measured at routing time against the hot set in force then. Every count saturates at the
largest value its file field holds (u64, the largest finite f64) instead of wrapping.
"""

from __future__ import annotations

import numpy as np

DEFAULT_HALF_LIFE = 16384  # tokens
U64_MAX = (1 << 64) - 1
_U64_MAX = np.uint64(U64_MAX)
F64_MAX = float(np.finfo(np.float64).max)


def add_u64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for u64 arrays (b >= 0), saturating at U64_MAX instead of wrapping."""
    b = np.asarray(b, np.uint64)
    return np.minimum(np.asarray(a, np.uint64), _U64_MAX - b) + b


def add_tokens(a: int, b: int) -> int:
    """a + b tokens (b >= 0), saturating at U64_MAX (the file's u64)."""
    return min(a + max(b, 0), U64_MAX)


def total_u64(a: np.ndarray) -> int:
    """The exact sum of a u64 array (numpy's own sum wraps)."""
    return int(np.asarray(a, np.uint64).sum(dtype=object))


def clamp_decayed(d: np.ndarray) -> np.ndarray:
    """Decayed counts kept finite (a sum of huge counts from a file would become inf)."""
    return np.minimum(d, F64_MAX)


class ExpertCounts:
    """The routing statistics of one model: lifetime and decayed counts per (layer, expert), tokens counted, and
    the online hit counters (routes that went to an expert of the hot set in force then)."""

    def __init__(self, n_layer: int, n_expert: int, n_used: int, half_life: float = DEFAULT_HALF_LIFE) -> None:
        if half_life <= 0:
            raise ValueError(f"the decay half-life must be positive, got {half_life}")
        self.n_layer, self.n_expert, self.n_used = n_layer, n_expert, n_used
        self.half_life = float(half_life)
        self.lifetime = np.zeros((n_layer, n_expert), np.uint64)
        self.decayed = np.zeros((n_layer, n_expert), np.float64)
        self.tokens = 0  # tokens counted (lifetime)
        # online hit accounting against the hot set in force at routing time
        self.hits = np.zeros(n_layer, np.uint64)
        self.routed = np.zeros(n_layer, np.uint64)
        self.bad_routes = 0  # ids out of range or repeated within a token (never expected from the engine)

    def add(self, routes: np.ndarray, hot: np.ndarray | None = None) -> None:
        """routes: int [n_layer, n_tokens, n_used], the experts each token was routed to in each layer.
        hot: bool [n_layer, n_expert], the current hot set (for the hit rate), or None."""
        L, n, k = routes.shape
        if self.n_layer != L or k != self.n_used:
            raise ValueError(f"routes of shape {routes.shape} for {self.n_layer} layers, top-{self.n_used}")
        r = routes.astype(np.int64, copy=False)
        ok = (r >= 0) & (r < self.n_expert)
        if not ok.all():
            self.bad_routes += int((~ok).sum())
            r = np.where(ok, r, 0)
        flat = (np.arange(L, dtype=np.int64)[:, None, None] * self.n_expert + r)[ok]
        batch = np.bincount(flat, minlength=L * self.n_expert).reshape(L, self.n_expert)
        if hot is not None:
            self.hits = add_u64(self.hits, (batch * hot).sum(axis=1))
        self.routed = add_u64(self.routed, ok.sum(axis=(1, 2)))
        self.decayed = clamp_decayed(self.decayed * 0.5 ** (n / self.half_life) + batch)
        self.lifetime = add_u64(self.lifetime, batch)
        self.tokens = add_tokens(self.tokens, n)

    def hit_rate(self) -> float | None:
        """The share of routes that went to a hot expert so far, or None before any route."""
        total = total_u64(self.routed)
        return total_u64(self.hits) / total if total else None

    def load(self, lifetime: np.ndarray, decayed: np.ndarray, tokens: int) -> None:
        """Replace the statistics (from a validated file); the online hit counters are kept."""
        self.lifetime = lifetime.astype(np.uint64).copy()
        self.decayed = decayed.astype(np.float64).copy()
        self.tokens = int(tokens)
