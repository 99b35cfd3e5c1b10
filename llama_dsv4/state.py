"""`LlamaState`: a snapshot of one sequence's evaluation state, the value `Llama.save_state()` returns and prompt
caches (cache.py) store, and `check_state`, which decides whether a snapshot fits a sequence before anything
of it is used (states come from pickles and disk caches: untrusted)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(eq=False)
class LlamaState:
    """A snapshot of a sequence's evaluation state (save_state / load_state, prompt caches).

    input_ids: the token buffer (its first n_tokens are the sequence); scores: the logits kept with it (every
    position with logits_all, else the last one); llama_state: the engine's own bytes (engine/context.pyx's
    format: caches, compressor rows, positions); seed: the sampling seed at the time of the snapshot.
    """

    input_ids: npt.NDArray[np.intc]
    scores: npt.NDArray[np.single]
    n_tokens: int
    llama_state: bytes
    llama_state_size: int
    seed: int


def check_state(
    state: Any, n_ctx: int, n_vocab: int, logits_all: bool
) -> tuple[int, npt.NDArray[Any], npt.NDArray[Any], int]:
    """(n_tokens, input_ids, scores, seed) of a LlamaState, checked against a sequence of `n_ctx` positions over a
    vocabulary of `n_vocab` (keeping every position's logits if `logits_all`); a ValueError naming what does not
    fit. The engine bytes are checked by the engine (Context.check_state)."""
    if not all(hasattr(state, f) for f in ("input_ids", "scores", "n_tokens", "llama_state", "seed")):
        raise ValueError(f"not a LlamaState: a {type(state).__name__}")
    try:
        n = operator.index(state.n_tokens)
        seed = operator.index(state.seed)
    except TypeError:
        raise ValueError(
            f"not a state of this Llama: n_tokens {state.n_tokens!r} and seed {state.seed!r} must be integers"
        ) from None
    if not isinstance(state.llama_state, (bytes, bytearray, memoryview)):
        kind = type(state.llama_state).__name__
        raise ValueError(f"not a state of this Llama: llama_state is a {kind}, not bytes")
    if not 0 <= n <= n_ctx:
        raise ValueError(f"not a state of this Llama: {n} tokens for a context of {n_ctx}")
    ids = np.asarray(state.input_ids)
    if ids.ndim != 1 or len(ids) < n or (n and ids.dtype.kind not in "iu"):
        raise ValueError(f"not a state of this Llama: {n} tokens, but {ids.size} token ids of type {ids.dtype}")
    if n and not ((ids[:n] >= 0) & (ids[:n] < n_vocab)).all():
        raise ValueError(f"not a state of this Llama: token ids outside the vocabulary [0, {n_vocab})")
    scores = np.asarray(state.scores)
    rows = n if logits_all else min(n, 1)
    if scores.ndim != 2 or scores.shape[1] != n_vocab or scores.dtype.kind != "f" or len(scores) < rows:
        have = len(scores) if scores.ndim == 2 else 0
        raise ValueError(
            f"not a state of this Llama: logits for {have} of {n} positions (shape {scores.shape}); this Llama "
            f"(n_vocab {n_vocab}, logits_all={logits_all}) needs {rows}"
        )
    return n, ids, scores, seed
