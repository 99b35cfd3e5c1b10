"""llama-cpp-python's low-level API (`llama_cpp.llama_cpp`: llama_model_load_from_file, llama_tokenize,
llama_batch_init, llama_decode, llama_get_logits, llama_memory_seq_rm, ...) over llama-dsv4's engine, with the same
calling conventions: handles for models, vocabularies, contexts and memories (handles.py), ctypes structures the
caller fills (llama_batch), ctypes buffers the functions write into (token ids, text pieces) and a `POINTER(c_float)`
to the logits of the last decode.

A model is a vocab-only `Llama`; a context is a `Llama` of its own over the same file (llama_init_from_model), so
everything `Llama` checks holds here too. `Llama.model` and `Llama.ctx` are handles of the same kind over a Llama
made with the high-level API: decoding through them moves that Llama's sequence (`n_tokens`, `input_ids`), so both
APIs can be mixed on one Llama (guidance does).

Where llama.cpp would crash (a token id out of range, a buffer smaller than its stated length, a freed handle, a
batch larger than n_batch) these raise ValueError or TypeError naming the argument; where llama.cpp returns an
error code for a condition of the run (a model file that does not load: NULL; no room left in the context:
llama_decode returns 1; an output buffer too small: the negative size needed) they return the same code.

A context with n_seq_max > 1 holds that many sequences (a `Llama` and its `slot(i)`): a batch may mix tokens of
several sequences (a token in several of them: a shared prompt), evaluated in shared ubatches; llama_memory_seq_cp
copies a sequence's state onto another (from its start), seq_rm / seq_keep / pos_min / pos_max work per sequence.
n_ctx is shared as llama.cpp shares it: split evenly among the sequences, or with kv_unified each up to n_ctx and
all of them together within it.

The limits of our engine: positions that continue each sequence (a decode at position p needs the sequence to
hold exactly p tokens: llama_memory_seq_rm cuts it back, and the engine re-evaluates what its compressed state lost),
no position shifts, token input only (no embeddings batches), logits only (no embeddings output). Each raises an
error that says so.

This module holds what the others share (handle kinds, logging, argument checks) and the system functions; models
and vocabularies are in lowlevel_model.py, contexts, batches, decoding and the memory in lowlevel_context.py, the
sampler chain in lowlevel_sampler.py, and lowlevel_api.py puts them in one namespace.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from . import constants as C
from .cbuffers import as_int
from .handles import resolve
from .lowlevel_types import llama_perf_context_data, llama_perf_sampler_data

_VOCAB = ("vocab", "model")  # vocabulary functions also take a model, as they did before llama.cpp split them
_MODEL = ("model",)
_CTX = ("context",)
_MEM = ("memory", "context")  # the older llama_kv_* names take the context
INT32_MAX = 2**31 - 1
ONE_SEQUENCE = "this context holds one sequence (seq_id 0, n_seq_max = 1)"


def _llama(h: Any, kinds: tuple[str, ...]) -> Any:
    return resolve(h, kinds)[1]


def _limit(n: Any, what: str) -> int:
    n = as_int(n, what)
    if not 0 <= n <= INT32_MAX:
        raise ValueError(f"{what} must be an integer in [0, {INT32_MAX}], got {n!r}")
    return n


# ------------------------------------------------------------------------------------------------ logging, system
_log_callback: Any = None
_log_user_data: Any = None


def llama_log_set(log_callback: Any, user_data: Any) -> None:
    """Send the low-level API's messages (a model that does not load, a full context, ...) to `log_callback(level,
    text, user_data)` (a `llama_log_callback`); None: to stderr. llama-dsv4's `Llama` reports through its own
    `verbose` output and exceptions, not through this callback."""
    global _log_callback, _log_user_data
    if log_callback is not None and not callable(log_callback):
        raise TypeError(f"log_callback must be a llama_log_callback or None, got {type(log_callback).__name__}")
    _log_callback, _log_user_data = log_callback, user_data


def log(level: int, text: str) -> None:
    """One message of the low-level API, to the llama_log_set callback or stderr."""
    line = text if text.endswith("\n") else text + "\n"
    if _log_callback is None:
        print(line, end="", file=sys.stderr)
    else:
        _log_callback(level, line.encode(), _log_user_data)


def llama_backend_init() -> None:
    """Nothing to do: the backends start with the first context."""


def llama_backend_free() -> None:
    """Nothing to do: each context releases its backends when freed."""


def llama_numa_init(numa: int) -> None:
    """Accepted for compatibility; llama-dsv4 does not place memory by NUMA node."""


def llama_time_us() -> int:
    return time.monotonic_ns() // 1000


def llama_max_parallel_sequences() -> int:
    return 1


def llama_supports_rpc() -> bool:
    return False


def llama_synchronize(ctx: int) -> None:
    """Nothing to wait for: llama_decode returns when its computation is done."""
    _llama(ctx, _CTX)


def llama_perf_context(ctx: int) -> llama_perf_context_data:
    """Timings of the context: t_eval_ms is the engine's compute time so far (graphs, inputs, compute); the token
    counts are not kept and read 0."""
    runner = _runner(ctx)
    data = llama_perf_context_data()
    data.t_eval_ms = 1000.0 * runner.compute_seconds()
    return data


def llama_perf_context_print(ctx: int) -> None:
    log(C.GGML_LOG_LEVEL_INFO, f"llama-dsv4: compute time {llama_perf_context(ctx).t_eval_ms:.2f} ms")


def llama_perf_context_reset(ctx: int) -> None:
    _runner(ctx).reset_timings()


def _runner(ctx: int) -> Any:
    """The engine runner (llama_dsv4.runner.Runner) of a context handle."""
    seq = _llama(ctx, _CTX).sequence
    seq.check_usable()
    return seq.runner


def llama_perf_sampler(chain: int) -> llama_perf_sampler_data:
    """Sampler timings are not kept: zeros."""
    _llama(chain, ("sampler",))
    return llama_perf_sampler_data()


def llama_perf_sampler_print(chain: int) -> None:
    _llama(chain, ("sampler",))


def llama_perf_sampler_reset(chain: int) -> None:
    _llama(chain, ("sampler",))


__all__ = [n for n in list(globals()) if n.startswith("llama_") and callable(globals()[n])]
