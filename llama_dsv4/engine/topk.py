"""The engine's top-k selection (kernels/dsv4_topk.c, as llama.cpp's CPU top-k) in plain Python, for references
that must pick the same entries when scores tie: tests/numpy_dsv4.py and the training recipe's exact mode
(train/model.py)."""

from __future__ import annotations

import numpy as np


def heap_top_k(score: np.ndarray, k: int) -> list[int]:
    """The k indices a heap select (make a heap of the first k, then replace its weakest with each later element
    that beats it) keeps, with "beats" meaning strictly greater. Ties are broken exactly as the reference's CPU
    top-k (std::partial_sort) breaks them, which matters: the indexer's relu makes exact ties (zeros) common."""
    heap = list(range(k))

    def better(a: int, b: int) -> bool:
        return score[a] > score[b]

    def adjust(hole: int, n: int, value: int) -> None:
        top, child = hole, hole
        while child < (n - 1) // 2:
            child = 2 * (child + 1)
            if better(heap[child], heap[child - 1]):
                child -= 1
            heap[hole] = heap[child]
            hole = child
        if n % 2 == 0 and child == (n - 2) // 2:
            child = 2 * (child + 1)
            heap[hole] = heap[child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and better(heap[parent], value):
            heap[hole] = heap[parent]
            hole = parent
            parent = (hole - 1) // 2
        heap[hole] = value

    if k >= 2:
        for parent in range((k - 2) // 2, -1, -1):
            adjust(parent, k, heap[parent])
    for i in range(k, len(score)):
        if better(i, heap[0]):
            adjust(0, k, i)
    return heap
