"""Which experts are hot: ranking, the auto per-layer counts, and the byte budget (docs/moe-residency.md).

Pure functions of count matrices [n_layer, n_expert]; deterministic (ties by lower expert id, then lower layer).
"""

from __future__ import annotations

import numpy as np

DEFAULT_COVERAGE = 0.99


def ranking(score: np.ndarray, lifetime: np.ndarray) -> np.ndarray:
    """Per layer, expert ids hottest first: by score (decayed counts), then lifetime counts, then lower id."""
    L, E = score.shape
    ids = np.broadcast_to(np.arange(E), (L, E))
    # lexsort sorts by the last key first; one call per layer keeps it simple and exact
    return np.stack([np.lexsort((ids[li], -lifetime[li].astype(np.float64), -score[li])) for li in range(L)])


def auto_counts(
    score: np.ndarray, previous: np.ndarray, coverage: float = DEFAULT_COVERAGE, floor: int = 1
) -> np.ndarray:
    """Per layer, the smallest m whose top-m experts hold `coverage` of the layer's (decayed) activations,
    clamped to [floor, n_expert]; a layer with no activations keeps its previous count."""
    L, E = score.shape
    out = previous.astype(np.int64).copy()
    srt = -np.sort(-score, axis=1)
    total = srt.sum(axis=1)
    for li in range(L):
        if total[li] <= 0:
            continue
        cum = np.cumsum(srt[li])
        m = int(np.searchsorted(cum, coverage * total[li] * (1 - 1e-12), side="left")) + 1
        out[li] = min(max(m, floor), E)
    return out


def trim_to_budget(
    score: np.ndarray, hot: np.ndarray, bytes_per_expert: np.ndarray, budget: int, floor: int
) -> tuple[np.ndarray, str | None]:
    """Lower per-layer hot counts until Σ hot[li]·bytes[li] <= budget, spending bytes where they cover the most
    activations: a floor of min(floor, hot[li]) everywhere if it fits (else nothing), then (layer, rank) candidates
    by score/bytes, highest first, each taken only if it extends its layer's prefix and fits. Never raises a count.
    Returns the new counts and a warning (or None)."""
    hot = hot.astype(np.int64)
    b = bytes_per_expert.astype(np.int64)
    if int((hot * b).sum()) <= budget:
        return hot, None
    warning = None
    start = np.minimum(floor, hot)
    if int((start * b).sum()) > budget:
        warning = (
            f"MoE hot budget {budget / 2**20:.1f} MiB is below {floor} experts per layer "
            f"({(start * b).sum() / 2**20:.1f} MiB); starting from no hot experts"
        )
        start = np.zeros_like(hot)
    srt = -np.sort(-score, axis=1)
    cand = [
        (float(srt[li, r]) / float(b[li]), r, li)
        for li in range(hot.shape[0])
        if b[li] > 0
        for r in range(int(start[li]), int(hot[li]))
    ]
    cand.sort(key=lambda c: (-c[0], c[1], c[2]))
    out = start.copy()
    left = budget - int((start * b).sum())
    blocked = np.zeros(hot.shape[0], bool)
    for _, r, li in cand:
        if blocked[li] or r != out[li]:
            blocked[li] = True
            continue
        if b[li] > left:
            blocked[li] = True
            continue
        out[li] += 1
        left -= int(b[li])
    return out, warning
