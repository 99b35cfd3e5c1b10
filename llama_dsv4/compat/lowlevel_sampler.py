"""llama.cpp's sampler chain in llama-cpp-python's low-level API (llama_sampler_chain_init, llama_sampler_init_top_k
/ top_p / min_p / temp / greedy / dist, llama_sampler_chain_add, llama_sampler_sample, llama_sampler_apply on a
llama_token_data_array, ...): each stage works on the candidates (ids, logits) in chain order, as llama.cpp's do;
the chain must end with a stage that selects a token (greedy or dist).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..sampling import softmax, top_order
from . import constants as C
from .cbuffers import as_int
from .handles import register, release, resolve
from .lowlevel import _CTX, _limit, _llama
from .lowlevel_context import llama_get_logits_ith
from .lowlevel_types import llama_sampler_chain_params, llama_token_data, llama_token_data_array

_SMPL = ("sampler",)


class _Candidates:
    def __init__(self, ids: np.ndarray, logits: np.ndarray, is_sorted: bool = False) -> None:
        self.ids, self.logits, self.sorted, self.selected = ids, logits, is_sorted, -1

    def keep(self, order: np.ndarray, is_sorted: bool) -> None:
        self.ids, self.logits, self.sorted = self.ids[order], self.logits[order], is_sorted

    def sort(self) -> None:
        if not self.sorted:
            self.keep(np.argsort(-self.logits, kind="stable"), True)


class _Stage:
    name = "stage"
    seed = C.LLAMA_DEFAULT_SEED

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.chain: _Chain | None = None  # the chain that owns this stage once added

    def apply(self, c: _Candidates) -> None:
        raise NotImplementedError

    def accept(self, token: int) -> None:
        pass

    def reset(self) -> None:
        pass


class _Greedy(_Stage):
    name = "greedy"

    def apply(self, c: _Candidates) -> None:
        c.selected = int(np.argmax(c.logits)) if c.logits.size else -1


class _Dist(_Stage):
    name = "dist"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed = int(seed) & 0xFFFFFFFF
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(None if self.seed == C.LLAMA_DEFAULT_SEED else self.seed)

    def apply(self, c: _Candidates) -> None:
        if not c.logits.size:
            return
        p = softmax(c.logits.astype(np.float64))
        c.selected = int(self.rng.choice(p.size, p=p / p.sum())) if np.isfinite(p).all() else int(np.argmax(c.logits))


class _TopK(_Stage):
    name = "top-k"

    def apply(self, c: _Candidates) -> None:
        (k,) = self.args
        if 0 < k < c.logits.size:
            c.keep(top_order(c.logits, k), True)
        elif k > 0:
            c.sort()


class _TopP(_Stage):
    name = "top-p"

    def apply(self, c: _Candidates) -> None:
        p, min_keep = self.args
        if p >= 1.0 or c.logits.size <= 1:
            return
        c.sort()
        cum = np.cumsum(softmax(c.logits))
        n = int(np.searchsorted(cum, p)) + 1
        c.keep(np.arange(max(min(n, c.logits.size), min_keep, 1)), True)


class _MinP(_Stage):
    name = "min-p"

    def apply(self, c: _Candidates) -> None:
        p, min_keep = self.args
        if p <= 0.0 or c.logits.size <= 1:
            return
        keep = np.flatnonzero(c.logits >= c.logits.max() + np.log(p))
        if keep.size < max(min_keep, 1):
            c.sort()
            keep = np.arange(min(max(min_keep, 1), c.logits.size))
        c.keep(keep, c.sorted)


class _Temp(_Stage):
    name = "temp"

    def apply(self, c: _Candidates) -> None:
        (t,) = self.args
        if t <= 0.0:
            best = int(np.argmax(c.logits)) if c.logits.size else 0
            c.logits = np.where(np.arange(c.logits.size) == best, c.logits, -np.inf).astype(np.float32)
        else:
            c.logits = (c.logits / np.float32(t)).astype(np.float32)


class _Chain(_Stage):
    name = "chain"

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[tuple[_Stage, int]] = []

    @property  # type: ignore[override]
    def seed(self) -> int:
        return next((s.seed for s, _ in reversed(self.stages) if s.seed != C.LLAMA_DEFAULT_SEED), C.LLAMA_DEFAULT_SEED)

    def apply(self, c: _Candidates) -> None:
        for s, _ in self.stages:
            s.apply(c)

    def accept(self, token: int) -> None:
        for s, _ in self.stages:
            s.accept(token)

    def reset(self) -> None:
        for s, _ in self.stages:
            s.reset()


def _new(stage: _Stage) -> int:
    return register(stage, "sampler")


def _stage(smpl: Any) -> _Stage:
    return resolve(smpl, _SMPL)[1]


def llama_sampler_chain_init(params: llama_sampler_chain_params | None = None) -> int:
    return _new(_Chain())


def llama_sampler_chain_add(chain: int, smpl: int) -> None:
    """Add `smpl` to the end of `chain`, which owns it from now on (freed with the chain)."""
    ch, s = _stage(chain), _stage(smpl)
    if not isinstance(ch, _Chain):
        raise TypeError(f"llama_sampler_chain_add: {int(chain):#x} is a {ch.name} sampler, not a chain")
    if s.chain is not None or s is ch:
        raise ValueError("llama_sampler_chain_add: this sampler already belongs to a chain")
    s.chain = ch
    ch.stages.append((s, int(smpl)))


def llama_sampler_chain_n(chain: int) -> int:
    ch = _stage(chain)
    return len(ch.stages) if isinstance(ch, _Chain) else 0


def llama_sampler_chain_get(chain: int, i: int) -> int | None:
    ch = _stage(chain)
    if not isinstance(ch, _Chain) or not isinstance(i, int) or not 0 <= i < len(ch.stages):
        return None
    return ch.stages[i][1]


def llama_sampler_init_greedy() -> int:
    return _new(_Greedy())


def llama_sampler_init_dist(seed: int) -> int:
    return _new(_Dist(_limit(int(seed) & 0xFFFFFFFF, "seed")))


def llama_sampler_init_top_k(k: int) -> int:
    return _new(_TopK(as_int(k, "k")))


def _prob(p: Any, name: str) -> float:
    p = float(p)
    if not np.isfinite(p):
        raise ValueError(f"{name} must be a finite number, got {p}")
    return p


def llama_sampler_init_top_p(p: float, min_keep: int = 1) -> int:
    return _new(_TopP(_prob(p, "p"), _limit(min_keep, "min_keep")))


def llama_sampler_init_min_p(p: float, min_keep: int = 1) -> int:
    return _new(_MinP(_prob(p, "p"), _limit(min_keep, "min_keep")))


def llama_sampler_init_temp(t: float) -> int:
    return _new(_Temp(_prob(t, "t")))


def llama_sampler_name(smpl: int) -> bytes:
    return _stage(smpl).name.encode()


def llama_sampler_get_seed(smpl: int) -> int:
    return int(_stage(smpl).seed)


def llama_sampler_accept(smpl: int, token: int) -> None:
    _stage(smpl).accept(int(token))


def llama_sampler_reset(smpl: int) -> None:
    _stage(smpl).reset()


def llama_sampler_free(smpl: int) -> None:
    """Free a sampler (a chain frees the samplers it owns; one added to a chain is freed with it)."""
    s = _stage(smpl)
    if s.chain is not None:
        raise ValueError("llama_sampler_free: this sampler belongs to a chain; free the chain")
    release(smpl, _SMPL)
    if isinstance(s, _Chain):
        for _, h in s.stages:
            release(h, _SMPL)


def llama_sampler_sample(smpl: int, ctx: int, idx: int) -> int:
    """Run the sampler on the logits of output `idx` of the context's last decode (-1: the last), accept the token
    it selects and return it."""
    s = _stage(smpl)
    n_vocab = _llama(ctx, _CTX).n_vocab()
    ptr = llama_get_logits_ith(ctx, idx)
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32)
    c = _Candidates(np.arange(n_vocab, dtype=np.int32), logits)
    s.apply(c)
    if not 0 <= c.selected < c.ids.size:
        raise ValueError(
            "llama_sampler_sample: the sampler selected no token; end the chain with llama_sampler_init_greedy() "
            "or llama_sampler_init_dist(seed)"
        )
    token = int(c.ids[c.selected])
    s.accept(token)
    return token


def llama_sampler_apply(smpl: int, cur_p: Any) -> None:
    """Apply the sampler to a llama_token_data_array (or a pointer to one) in place: its data, size, sorted and
    selected fields are updated as llama.cpp's samplers update them."""
    s = _stage(smpl)
    arr = cur_p.contents if isinstance(cur_p, ctypes._Pointer) else getattr(cur_p, "_obj", cur_p)  # type: ignore[attr-defined]
    if not isinstance(arr, llama_token_data_array):
        raise TypeError(f"cur_p must be a llama_token_data_array or a pointer to one, got {type(cur_p).__name__}")
    n = int(arr.size)
    if n and not arr.data:
        raise ValueError("cur_p.data is NULL")
    view = np.ctypeslib.as_array(arr.data, shape=(n,)) if n else np.zeros(0, _DTYPE)
    c = _Candidates(view["id"].astype(np.int32), view["logit"].astype(np.float32), bool(arr.sorted))
    s.apply(c)
    m = c.ids.size
    view[:m]["id"], view[:m]["logit"] = c.ids, c.logits
    if m:
        view[:m]["p"] = softmax(c.logits) if np.isfinite(c.logits).any() else 0.0
    arr.size, arr.sorted, arr.selected = m, c.sorted, c.selected


_DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert ctypes.sizeof(llama_token_data) == _DTYPE.itemsize


__all__ = [n for n in list(globals()) if n.startswith("llama_sampler_") and callable(globals()[n])]
