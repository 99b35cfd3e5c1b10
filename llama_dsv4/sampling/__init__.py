"""Token sampling as llama-cpp-python configures llama.cpp's sampler chain, in numpy.

Order: logits processors (and logit_bias) -> repetition penalties over the last generated tokens -> grammar ->
greedy (temperature 0) | plain draw (temperature < 0) | mirostat v1/v2 | top-k -> typical-p -> top-p -> min-p ->
temperature -> draw. Greedy picks exactly what llama.cpp picks (the first maximum); random draws use numpy's
generator seeded per call (the same seed gives the same tokens here, not llama.cpp's).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

LogitsProcessor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]
StoppingCriteria = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class LogitsProcessorList(list):
    """Logits processors applied in order (llama-cpp-python's `LogitsProcessorList`). A processor is a callable
    `(input_ids, scores) -> scores`: the token ids so far and the next token's logits (float32, n_vocab), returning
    the logits to sample from. Pass it as `logits_processor=` to create_completion, generate or sample."""

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        """`scores` after each processor in turn."""
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """Stopping criteria (llama-cpp-python's `StoppingCriteriaList`). A criterion is a callable `(input_ids, logits)
    -> bool`, called after each sampled token with the token ids so far and the logits it was sampled from; the
    generation stops when any returns True. Pass it as `stopping_criteria=` to create_completion or generate."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        """True when any criterion says stop."""
        return any(criteria(input_ids, logits) for criteria in self)


class MinTokensLogitsProcessor:
    """Forbid the end-of-sequence token until `min_tokens` tokens were generated."""

    def __init__(self, min_tokens: int, token_eos: int) -> None:
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: int | None = None

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        """`scores` with the end-of-sequence token at -inf while fewer than `min_tokens` were generated (the first
        call's input_ids are taken as the prompt)."""
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """A logits processor adding `bias[token]` to each listed token's logit (OpenAI's `logit_bias`)."""
    ids = np.array([int(k) for k in bias], np.int64)
    vals = np.array([float(v) for v in bias.values()], np.float32)

    def apply(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        out = np.array(scores, copy=True)
        out[ids] += vals
        return out

    return apply


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of `logits` (float64); all -inf gives zeros, a +inf or NaN maximum a uniform distribution."""
    z = np.asarray(logits, np.float64)
    m = np.max(z)
    if not np.isfinite(m):
        return np.full(z.shape, 1.0 / z.size) if m != -np.inf else np.zeros(z.shape)
    e = np.exp(z - m)
    return e / e.sum()


def top_order(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first, ties by lower index (what a stable sort of -x gives), in
    O(n + k log k) instead of a full sort of the vocabulary."""
    n = x.size
    if k >= n:
        return np.argsort(-x, kind="stable")
    thr = np.partition(x, n - k)[n - k]
    above = np.flatnonzero(x > thr)
    cand = np.concatenate([above, np.flatnonzero(x == thr)[: k - above.size]])
    if cand.size < k:  # NaN logits: fall back to the full sort
        return np.argsort(-x, kind="stable")[:k]
    cand.sort()
    return cand[np.argsort(-x[cand], kind="stable")]


@dataclass
class SamplerParams:
    """The sampling settings of one generation, with llama-cpp-python's defaults (see the module docstring for the
    order they apply in); `penalty_last_n` is the penalties' window (Llama's last_n_tokens_size)."""

    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    temp: float = 0.80
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    penalty_last_n: int = 64

    def check(self) -> None:
        """ValueError (TypeError for a non-integer count) naming the first setting that cannot be used."""
        for name in (
            "top_p",
            "min_p",
            "typical_p",
            "temp",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
            "mirostat_tau",
            "mirostat_eta",
        ):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"sampling parameter {name} must be a finite number, got {v!r}")
        for name in ("top_k", "mirostat_mode", "penalty_last_n"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral):
                raise TypeError(f"sampling parameter {name} must be an integer, got {type(v).__name__} {v!r}")
        if self.mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0, 1 or 2, got {self.mirostat_mode}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be positive, got {self.repeat_penalty}")


@dataclass
class Sampler:
    """One generation's sampler: parameters, the random generator, and the state that persists across tokens
    (penalty window, mirostat's mu)."""

    params: SamplerParams
    seed: int
    logits_processor: LogitsProcessorList | None = None
    grammar: Any = None  # a constrained-decoding state with .mask(logits) and .accept(token)
    history: deque = field(default_factory=deque)
    rng: np.random.Generator = field(init=False)
    mu: float = field(init=False)

    def __post_init__(self) -> None:
        self.params.check()
        self.rng = np.random.default_rng(self.seed & 0xFFFFFFFFFFFFFFFF)
        self.mu = 2.0 * self.params.mirostat_tau
        self.history = deque(maxlen=max(self.params.penalty_last_n, 0))

    def accept(self, token: int) -> None:
        """Record `token` as generated: the penalty window and the grammar advance."""
        if self.history.maxlen:
            self.history.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    def sample(self, logits: np.ndarray, input_ids: np.ndarray) -> int:
        """Sample the next token from `logits` (the token ids so far in `input_ids`, for logits processors) and
        accept it."""
        p = self.params
        x = np.array(logits, np.float32, copy=True)
        if self.logits_processor:
            x = np.asarray(self.logits_processor(input_ids, x), np.float32)
        self._penalize(x)
        if self.grammar is not None:
            x = self.grammar.mask(x)
        if p.temp == 0.0:
            token = int(np.argmax(x))
        elif p.temp < 0.0:
            token = self._draw(x)
        elif p.mirostat_mode == 1:
            token = self._mirostat_v1(x)
        elif p.mirostat_mode == 2:
            token = self._mirostat_v2(x)
        else:
            keep = self._truncate(x)
            token = int(keep[self._draw(x[keep] / p.temp)]) if len(keep) > 1 else int(keep[0])
        self.accept(token)
        return token

    # ---- the steps
    def _penalize(self, x: np.ndarray) -> None:
        p = self.params
        if not self.history or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
            return
        ids, counts = np.unique(np.fromiter(self.history, np.int64), return_counts=True)
        ids, counts = ids[ids < x.size], counts[ids < x.size]
        v = x[ids]
        v = np.where(v <= 0, v * p.repeat_penalty, v / p.repeat_penalty)
        x[ids] = v - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty

    def _truncate(self, x: np.ndarray) -> np.ndarray:
        """Indices that survive top-k, typical-p, top-p and min-p (probabilities at temperature 1)."""
        p = self.params
        if p.top_k > 0:
            order = top_order(x, p.top_k)
        elif p.top_p < 1.0:  # only the prefix that reaches top_p matters: widen a partial sort until it does
            probs = softmax(x)
            k = 256
            while True:
                order = top_order(x, k)
                if k >= x.size or probs[order].sum() >= p.top_p:
                    break
                k *= 8
        else:
            order = top_order(x, x.size)
        order = order[np.isfinite(x[order])] if np.isfinite(x[order[0]]) else order[:1]
        if p.typical_p < 1.0 and len(order) > 1:
            probs = softmax(x[order])
            logp = np.log(np.maximum(probs, 1e-300))
            ent = -(probs * logp).sum()
            shifted = np.abs(-logp - ent)
            by_typ = np.argsort(shifted, kind="stable")
            cum = np.cumsum(probs[by_typ])
            n = int(np.searchsorted(cum, p.typical_p) + 1)
            order = order[np.sort(by_typ[: max(n, 1)])]
        if p.top_p < 1.0 and len(order) > 1:
            probs = softmax(x[order])
            cum = np.cumsum(probs)
            n = int(np.searchsorted(cum, p.top_p) + 1)
            order = order[: max(min(n, len(order)), 1)]
        if p.min_p > 0.0 and len(order) > 1:
            probs = softmax(x[order])
            kept = order[probs >= p.min_p * probs.max()]
            order = kept if len(kept) else order[:1]  # min_p > 1 keeps the top token, as llama.cpp's min_keep = 1
        return order

    def _draw(self, x: np.ndarray) -> int:
        probs = softmax(x)
        if probs.sum() <= 0:
            return int(np.argmax(x))
        return int(self.rng.choice(probs.size, p=probs / probs.sum()))

    def _mirostat_v1(self, x: np.ndarray) -> int:
        p = self.params
        x = x / p.temp
        order = np.argsort(-x, kind="stable")
        probs = softmax(x[order])
        m = min(100, len(probs) - 1)
        if m >= 1:
            t = np.log(probs[1 : m + 1] / probs[:m] + 1e-300)
            b = np.log(np.arange(2, m + 2) / np.arange(1, m + 1))
            s_hat = float((t * b).sum() / (b * b).sum())
        else:
            s_hat = 1.0
        eps = s_hat - 1.0
        n = float(len(probs))
        k = ((eps * 2.0**self.mu) / (1 - n ** (-eps))) ** (1 / s_hat) if eps != 0 else n
        k = int(min(max(k, 1), len(order)))
        keep = order[:k]
        y = np.full_like(x, -np.inf)
        y[keep] = x[keep]
        token = self._draw(y)
        self._mirostat_update(softmax(y)[token])
        return token

    def _mirostat_v2(self, x: np.ndarray) -> int:
        p = self.params
        x = x / p.temp
        order = np.argsort(-x, kind="stable")
        probs = softmax(x[order])
        surprise = -np.log2(np.maximum(probs, 1e-300))
        keep = order[: max(int((surprise <= self.mu).sum()), 1)]
        y = np.full_like(x, -np.inf)
        y[keep] = x[keep]
        token = self._draw(y)
        self._mirostat_update(softmax(y)[token])
        return token

    def _mirostat_update(self, prob: float) -> None:
        surprise = -math.log2(max(float(prob), 1e-300))
        self.mu -= self.params.mirostat_eta * (surprise - self.params.mirostat_tau)
