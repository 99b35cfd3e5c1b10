"""llama-cpp-python's `llama_cpp._internals`: the thin classes over the low-level API (LlamaModel, LlamaContext,
LlamaBatch, LlamaSampler) that code written for llama-cpp-python's internals uses, here over lowlevel.py. Closing
a model closes the contexts made from it first, as upstream."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from .lowlevel_api import lowlevel_module
from .lowlevel_types import llama_context_params, llama_model_params

ll = lowlevel_module()


class _Closing:
    """close() once (also from __del__), running the callbacks registered with on_close, last first."""

    def __init__(self) -> None:
        self._on_close: list[Any] = []

    def on_close(self, fn: Any) -> None:
        self._on_close.append(fn)

    def close(self) -> None:
        while getattr(self, "_on_close", None):
            self._on_close.pop()()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class LlamaModel(_Closing):
    """A model (llama_model_load_from_file) and its vocabulary."""

    def __init__(self, *, path_model: str, params: llama_model_params, verbose: bool = True) -> None:
        super().__init__()
        self.path_model, self.params, self.verbose = path_model, params, verbose
        self.model: int | None = None
        model = ll.llama_model_load_from_file(path_model.encode("utf-8"), params)
        if model is None:
            raise ValueError(f"Failed to load model from file: {path_model}")
        self.model, self.vocab = model, ll.llama_model_get_vocab(model)

        def free() -> None:
            if self.model is not None:
                ll.llama_model_free(self.model)
                self.model = None

        self.on_close(free)

    def vocab_type(self) -> int:
        return ll.llama_vocab_type(self.vocab)

    def n_vocab(self) -> int:
        return ll.llama_vocab_n_tokens(self.vocab)

    def n_ctx_train(self) -> int:
        return ll.llama_model_n_ctx_train(self.model)

    def n_embd(self) -> int:
        return ll.llama_model_n_embd(self.model)

    def rope_freq_scale_train(self) -> float:
        return 1.0

    def desc(self) -> str:
        buf = ctypes.create_string_buffer(1024)
        ll.llama_model_desc(self.model, buf, 1024)
        return buf.value.decode("utf-8", "replace")

    def size(self) -> int:
        return ll.llama_model_size(self.model)

    def n_params(self) -> int:
        return ll.llama_model_n_params(self.model)

    def token_get_text(self, token: int) -> str:
        return ll.llama_vocab_get_text(self.vocab, token).decode("utf-8")

    def token_get_score(self, token: int) -> float:
        return ll.llama_vocab_get_score(self.vocab, token)

    def token_get_attr(self, token: int) -> int:
        return ll.llama_vocab_get_attr(self.vocab, token)

    def token_bos(self) -> int:
        return ll.llama_vocab_bos(self.vocab)

    def token_eos(self) -> int:
        return ll.llama_vocab_eos(self.vocab)

    def token_cls(self) -> int:
        return ll.llama_vocab_cls(self.vocab)

    def token_sep(self) -> int:
        return ll.llama_vocab_sep(self.vocab)

    def token_nl(self) -> int:
        return ll.llama_vocab_nl(self.vocab)

    def token_eot(self) -> int:
        return ll.llama_vocab_eot(self.vocab)

    token_prefix = token_middle = token_suffix = token_eot

    def add_bos_token(self) -> bool:
        return ll.llama_vocab_get_add_bos(self.vocab)

    def add_eos_token(self) -> bool:
        return ll.llama_vocab_get_add_eos(self.vocab)

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        n_max = len(text) + 2
        tokens = (ctypes.c_int32 * n_max)()
        n = ll.llama_tokenize(self.vocab, text, len(text), tokens, n_max, add_bos, special)
        if n < 0:
            tokens = (ctypes.c_int32 * -n)()
            n = ll.llama_tokenize(self.vocab, text, len(text), tokens, -n, add_bos, special)
        return list(tokens[:n])

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        arr = (ctypes.c_int32 * max(len(tokens), 1))(*tokens)
        size = 64 + 16 * len(tokens)
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_detokenize(self.vocab, arr, len(tokens), buf, size, False, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_detokenize(self.vocab, arr, len(tokens), buf, -n, False, special)
        return buf.raw[:n]

    def metadata(self) -> dict[str, str]:
        out = {}
        for i in range(ll.llama_model_meta_count(self.model)):
            key = ctypes.create_string_buffer(256)
            n = ll.llama_model_meta_key_by_index(self.model, i, key, 256)
            if n >= 256:
                key = ctypes.create_string_buffer(n + 1)
                ll.llama_model_meta_key_by_index(self.model, i, key, n + 1)
            n = ll.llama_model_meta_val_str_by_index(self.model, i, None, 0)
            val = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str_by_index(self.model, i, val, n + 1)
            out[key.value.decode("utf-8", "replace")] = val.value.decode("utf-8", "replace")
        return out

    @staticmethod
    def default_params() -> llama_model_params:
        return ll.llama_model_default_params()


class LlamaContext(_Closing):
    """A context over a LlamaModel (llama_init_from_model); closed with its model."""

    def __init__(self, *, model: LlamaModel, params: llama_context_params, verbose: bool = True) -> None:
        super().__init__()
        self.model, self.params, self.verbose = model, params, verbose
        self.ctx: int | None = None
        ctx = ll.llama_init_from_model(model.model, params)
        if ctx is None:
            raise ValueError("Failed to create llama_context")
        self.ctx, self.memory = ctx, ll.llama_get_memory(ctx)

        def free() -> None:
            if self.ctx is not None:
                ll.llama_free(self.ctx)
                self.ctx = None

        self.on_close(free)
        model.on_close(self.close)

    def n_ctx(self) -> int:
        return ll.llama_n_ctx(self.ctx)

    def pooling_type(self) -> int:
        return ll.llama_pooling_type(self.ctx)

    def kv_cache_clear(self) -> None:
        ll.llama_memory_clear(self.memory, True)

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return ll.llama_memory_seq_rm(self.memory, seq_id, p0, p1)

    def kv_cache_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int, p1: int) -> None:
        ll.llama_memory_seq_cp(self.memory, seq_id_src, seq_id_dst, p0, p1)

    def kv_cache_seq_keep(self, seq_id: int) -> None:
        ll.llama_memory_seq_keep(self.memory, seq_id)

    def kv_cache_seq_shift(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        ll.llama_memory_seq_add(self.memory, seq_id, p0, p1, shift)

    def decode(self, batch: LlamaBatch) -> None:
        code = ll.llama_decode(self.ctx, batch.batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def set_n_threads(self, n_threads: int, n_threads_batch: int) -> None:
        ll.llama_set_n_threads(self.ctx, n_threads, n_threads_batch)

    def get_logits(self) -> Any:
        return ll.llama_get_logits(self.ctx)

    def get_logits_ith(self, i: int) -> Any:
        return ll.llama_get_logits_ith(self.ctx, i)

    def reset_timings(self) -> None:
        pass

    def print_timings(self) -> None:
        pass

    @staticmethod
    def default_params() -> llama_context_params:
        return ll.llama_context_default_params()


class LlamaBatch(_Closing):
    """A llama_batch of llama_batch_init, with the helpers that fill it for one sequence."""

    def __init__(self, *, n_tokens: int, embd: int, n_seq_max: int, verbose: bool = True) -> None:
        super().__init__()
        self._n_tokens, self.embd, self.n_seq_max, self.verbose = n_tokens, embd, n_seq_max, verbose
        self.batch: Any = ll.llama_batch_init(n_tokens, embd, n_seq_max)

        def free() -> None:
            if self.batch is not None:
                ll.llama_batch_free(self.batch)
                self.batch = None

        self.on_close(free)

    def n_tokens(self) -> int:
        return int(self.batch.n_tokens)

    def reset(self) -> None:
        self.batch.n_tokens = 0

    def _check_room(self, n: int) -> None:
        if n > self._n_tokens:
            raise ValueError(f"{n} tokens do not fit in this batch of {self._n_tokens}")

    def set_batch(self, batch: Sequence[int], n_past: int, logits_all: bool) -> None:
        """Fill with `batch` at positions n_past..., sequence 0; logits for all tokens or the last."""
        self.batch.n_tokens = 0
        self.add_sequence(batch, 0, logits_all, first_pos=n_past)

    def add_sequence(self, batch: Sequence[int], seq_id: int, logits_all: bool, first_pos: int = 0) -> None:
        n0, n = int(self.batch.n_tokens), len(batch)
        self._check_room(n0 + n)
        b = self.batch
        for i, t in enumerate(batch):
            j = n0 + i
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = int(t), first_pos + i, 1, bool(logits_all)
            b.seq_id[j][0] = seq_id
        if n:
            b.logits[n0 + n - 1] = True
        b.n_tokens = n0 + n


class LlamaSampler(_Closing):
    """A sampler chain (llama_sampler_chain_init) with add_* for its stages."""

    def __init__(self) -> None:
        super().__init__()
        self.sampler: int | None = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())

        def free() -> None:
            if self.sampler is not None:
                ll.llama_sampler_free(self.sampler)
                self.sampler = None

        self.on_close(free)

    def _add(self, smpl: int) -> None:
        ll.llama_sampler_chain_add(self.sampler, smpl)

    def add_greedy(self) -> None:
        self._add(ll.llama_sampler_init_greedy())

    def add_dist(self, seed: int) -> None:
        self._add(ll.llama_sampler_init_dist(seed))

    def add_top_k(self, k: int) -> None:
        self._add(ll.llama_sampler_init_top_k(k))

    def add_top_p(self, p: float, min_keep: int = 1) -> None:
        self._add(ll.llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int = 1) -> None:
        self._add(ll.llama_sampler_init_min_p(p, min_keep))

    def add_temp(self, temp: float) -> None:
        self._add(ll.llama_sampler_init_temp(temp))

    def get_seed(self) -> int:
        return ll.llama_sampler_get_seed(self.sampler)

    def sample(self, ctx: LlamaContext, idx: int = -1) -> int:
        return ll.llama_sampler_sample(self.sampler, ctx.ctx, idx)

    def accept(self, token: int) -> None:
        ll.llama_sampler_accept(self.sampler, token)

    def reset(self) -> None:
        ll.llama_sampler_reset(self.sampler)


def normalize_embedding(embedding: Any) -> list[float]:
    """Scale to unit length (a zero vector stays zero)."""
    v = np.asarray(embedding, np.float64)
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).tolist()


__all__ = ["LlamaBatch", "LlamaContext", "LlamaModel", "LlamaSampler", "normalize_embedding"]
