"""What the API layer needs from the engine, in plain Python (llama.py does not touch ggml or Cython types)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _ggml
from ..model.loader import ModelFile
from ..model.params import DSV4Params
from .context import Context


def create_context(
    model: ModelFile,
    params: DSV4Params,
    n_ctx: int,
    n_ubatch: int,
    type_k: str,
    flash_attn: bool,
    device: str,
    n_threads: int,
) -> Context:
    backends = _ggml.Backends(device, n_threads)
    return Context(
        model, n_ctx, n_ubatch=n_ubatch, type_k=type_k, backends=backends, flash_attn=flash_attn, params=params
    )


def set_threads(ctx: Context, n_threads: int) -> None:
    be = ctx.backends
    if be.threads != n_threads:
        be.set_threads(n_threads)


def truncate(ctx: Context, tokens: Any, n_batch: int) -> None:
    """Make the context hold exactly `tokens` (a prefix of what it holds): the compressors' partial blocks cannot
    be cut back, so the prefix is evaluated again."""
    ctx.reset()
    toks = np.asarray(tokens, np.int64)
    for i in range(0, len(toks), n_batch):
        ctx.eval(toks[i : i + n_batch])
