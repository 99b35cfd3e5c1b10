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

The limits of our engine: one sequence per context (seq_id 0; n_seq_max = 1), positions that continue the sequence
(a decode at position p needs the context to hold exactly p tokens: llama_memory_seq_rm cuts it back, and the
engine re-evaluates the kept prefix, since its compressed state cannot be cut), no position shifts, token input
only (no embeddings batches), logits only (no embeddings output). Each raises an error that says so.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from typing import Any

import numpy as np

from ..engine.cpus import fit_count
from ..tokenizer import check_token_ids
from . import cbuffers
from . import constants as C
from .handles import handle_of, register, release, resolve
from .lowlevel_types import (
    llama_batch,
    llama_context_default_params,
    llama_context_params,
    llama_model_default_params,
    llama_model_params,
    llama_sampler_chain_default_params,
)

__all__ = [
    "llama_batch",
    "llama_context_default_params",
    "llama_model_default_params",
    "llama_sampler_chain_default_params",
]  # extended below: every llama_* function of this module

_VOCAB = ("vocab", "model")  # vocabulary functions also take a model, as they did before llama.cpp split them
_MODEL = ("model",)
_CTX = ("context",)
_MEM = ("memory", "context")  # the older llama_kv_* names take the context
INT32_MAX = 2**31 - 1
ONE_SEQUENCE = "a llama-dsv4 context holds one sequence (seq_id 0, n_seq_max = 1)"


def _llama(h: Any, kinds: tuple[str, ...]) -> Any:
    return resolve(h, kinds)[1]


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


# ------------------------------------------------------------------------------------------------ models
def _load_flags(params: Any) -> tuple[bool, bool]:
    """(use_mmap, use_mlock) from load_mode, or from the use_mmap / use_mlock attributes older callers set."""
    if params is None:
        return True, False
    mode = int(getattr(params, "load_mode", C.LLAMA_LOAD_MODE_AUTO))
    use_mmap = mode in (C.LLAMA_LOAD_MODE_AUTO, C.LLAMA_LOAD_MODE_MMAP, C.LLAMA_LOAD_MODE_MMAP_MLOCK)
    use_mlock = mode in (C.LLAMA_LOAD_MODE_MLOCK, C.LLAMA_LOAD_MODE_MMAP_MLOCK)
    extra = vars(params) if hasattr(params, "__dict__") else {}
    return bool(extra.get("use_mmap", use_mmap)), bool(extra.get("use_mlock", use_mlock))


def llama_model_load_from_file(path_model: bytes | str, params: llama_model_params | None = None) -> int | None:
    """A model handle, or None (and the reason logged) if the file does not load, as llama.cpp."""
    from ..llama import Llama

    if not isinstance(path_model, (bytes, str, os.PathLike)):
        raise TypeError(f"path_model must be bytes (the file's path), got {type(path_model).__name__}")
    path = os.fsdecode(path_model)
    use_mmap, use_mlock = _load_flags(params)
    try:
        llm = Llama(path, vocab_only=True, use_mmap=use_mmap, verbose=False)
    except (ValueError, OSError) as e:
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_model_load_from_file: failed to load model from {path}: {e}")
        return None
    llm._lowlevel_load = {"use_mmap": use_mmap, "use_mlock": use_mlock}
    return register(llm, "model")


llama_load_model_from_file = llama_model_load_from_file  # the name before llama.cpp b4000


def llama_model_free(model: int) -> None:
    """Free a model from llama_model_load_from_file (contexts made from it keep working until freed)."""
    release(model, _MODEL).close()


llama_free_model = llama_model_free


def llama_model_get_vocab(model: int) -> int:
    llm = _llama(model, _MODEL)
    return handle_of(llm, "vocab")


def _params(model: Any) -> Any:
    return _llama(model, _MODEL)._params


def llama_model_n_ctx_train(model: int) -> int:
    return int(_params(model).n_ctx_train)


def llama_model_n_embd(model: int) -> int:
    return int(_params(model).n_embd)


def llama_model_n_layer(model: int) -> int:
    return int(_params(model).n_layer)


def llama_model_n_head(model: int) -> int:
    return int(_params(model).n_head)


def llama_model_n_head_kv(model: int) -> int:
    return 1  # one latent key/value head shared by all query heads


def llama_model_n_swa(model: int) -> int:
    return int(_params(model).window)


def llama_model_n_params(model: int) -> int:
    return sum(t.n_elements for t in _llama(model, _MODEL)._model.tensors.values())


def llama_model_size(model: int) -> int:
    return int(_llama(model, _MODEL)._model.n_bytes)


def llama_model_has_encoder(model: int) -> bool:
    _llama(model, _MODEL)
    return False


def llama_model_has_decoder(model: int) -> bool:
    _llama(model, _MODEL)
    return True


def llama_model_is_recurrent(model: int) -> bool:
    _llama(model, _MODEL)
    return False


llama_model_is_hybrid = llama_model_is_diffusion = llama_model_is_recurrent


def llama_model_decoder_start_token(model: int) -> int:
    _llama(model, _MODEL)
    return C.LLAMA_TOKEN_NULL


def _snprintf(text: str | bytes, buf: Any, buf_size: int) -> int:
    """C's snprintf into buf: at most buf_size - 1 bytes and a NUL; returns the full length."""
    data = text.encode() if isinstance(text, str) else text
    if isinstance(buf_size, bool) or not isinstance(buf_size, int) or buf_size < 0:
        raise ValueError(f"buf_size must be a non-negative integer, got {buf_size!r}")
    if buf_size > 0:
        cbuffers.write_bytes(buf, buf_size, data[: buf_size - 1] + b"\0", "buf")
    return len(data)


def llama_model_desc(model: int, buf: Any, buf_size: int) -> int:
    llm = _llama(model, _MODEL)
    label = llm.metadata.get("general.size_label") or f"{llama_model_n_params(model) / 1e9:.1f}B"
    return _snprintf(f"deepseek4 {label}", buf, buf_size)


def _meta_items(model: Any) -> list[tuple[str, str]]:
    return list(_llama(model, _MODEL).metadata.items())


def llama_model_meta_val_str(model: int, key: bytes | str, buf: Any, buf_size: int) -> int:
    """The metadata value of `key` as a string into buf; -1 (and buf cleared) if there is none."""
    k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    value = _llama(model, _MODEL).metadata.get(k)
    if value is None:
        _snprintf(b"", buf, min(buf_size, 1) if isinstance(buf_size, int) else buf_size)
        return -1
    return _snprintf(value, buf, buf_size)


def llama_model_meta_count(model: int) -> int:
    return len(_meta_items(model))


def _meta_at(model: int, i: int, which: int, buf: Any, buf_size: int) -> int:
    items = _meta_items(model)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(items):
        _snprintf(b"", buf, min(buf_size, 1) if isinstance(buf_size, int) else buf_size)
        return -1
    return _snprintf(items[i][which], buf, buf_size)


def llama_model_meta_key_by_index(model: int, i: int, buf: Any, buf_size: int) -> int:
    return _meta_at(model, i, 0, buf, buf_size)


def llama_model_meta_val_str_by_index(model: int, i: int, buf: Any, buf_size: int) -> int:
    return _meta_at(model, i, 1, buf, buf_size)


def llama_model_chat_template(model: int, name: bytes | str | None) -> bytes | None:
    """The file's chat template (`name`: a named one, tokenizer.chat_template.NAME), None if it has none."""
    key = "tokenizer.chat_template"
    if name:
        key += "." + (name.decode() if isinstance(name, bytes) else str(name))
    value = _llama(model, _MODEL).metadata.get(key)
    return value.encode() if value is not None else None


# deprecated names that took the model
llama_n_ctx_train, llama_n_embd = llama_model_n_ctx_train, llama_model_n_embd
llama_n_layer, llama_n_head = llama_model_n_layer, llama_model_n_head


# ------------------------------------------------------------------------------------------------ vocabulary
def _vocab(vocab: Any) -> Any:
    """The Llama of a vocab (or model) handle, after checking it has a tokenizer."""
    llm = _llama(vocab, _VOCAB)
    llm._require_vocab()
    return llm


def _token(llm: Any, token: Any) -> int:
    (t,) = check_token_ids((token,), llm.n_vocab())
    return t


def llama_vocab_n_tokens(vocab: int) -> int:
    return int(_llama(vocab, _VOCAB).n_vocab())


llama_n_vocab = llama_vocab_n_tokens


def llama_vocab_type(vocab: int) -> int:
    llm = _llama(vocab, _VOCAB)
    return C.LLAMA_VOCAB_TYPE_BPE if llm._vocab is not None else C.LLAMA_VOCAB_TYPE_NONE


def llama_vocab_get_text(vocab: int, token: int) -> bytes:
    llm = _vocab(vocab)
    return llm._vocab.tokens[_token(llm, token)].encode()


def llama_vocab_get_score(vocab: int, token: int) -> float:
    llm = _vocab(vocab)
    _token(llm, token)
    return 0.0  # a BPE vocabulary has no scores


_ATTRS = {
    1: C.LLAMA_TOKEN_ATTR_NORMAL,
    2: C.LLAMA_TOKEN_ATTR_UNKNOWN,
    3: C.LLAMA_TOKEN_ATTR_CONTROL,
    4: C.LLAMA_TOKEN_ATTR_USER_DEFINED,
    5: C.LLAMA_TOKEN_ATTR_UNUSED,
    6: C.LLAMA_TOKEN_ATTR_BYTE,
}


def llama_vocab_get_attr(vocab: int, token: int) -> int:
    llm = _vocab(vocab)
    return _ATTRS.get(int(llm._vocab.token_types[_token(llm, token)]), C.LLAMA_TOKEN_ATTR_UNDEFINED)


def llama_vocab_is_eog(vocab: int, token: int) -> bool:
    llm = _vocab(vocab)
    return bool(llm._is_eog(_token(llm, token)))


def llama_vocab_is_control(vocab: int, token: int) -> bool:
    return llama_vocab_get_attr(vocab, token) == C.LLAMA_TOKEN_ATTR_CONTROL


def _special(vocab: Any, attr: str) -> int:
    v = _llama(vocab, _VOCAB)._vocab
    value = getattr(v, attr) if v is not None else None
    return int(value) if value is not None else C.LLAMA_TOKEN_NULL


def llama_vocab_bos(vocab: int) -> int:
    return _special(vocab, "bos_id")


def llama_vocab_eos(vocab: int) -> int:
    return _special(vocab, "eos_id")


def llama_vocab_pad(vocab: int) -> int:
    return _special(vocab, "pad_id")


def llama_vocab_nl(vocab: int) -> int:
    return int(_llama(vocab, _VOCAB).token_nl())


def llama_vocab_eot(vocab: int) -> int:
    _llama(vocab, _VOCAB)
    return C.LLAMA_TOKEN_NULL  # DeepSeek V4 ends a turn with EOS


llama_vocab_sep = llama_vocab_mask = llama_vocab_cls = llama_vocab_eot
llama_vocab_fim_pre = llama_vocab_fim_suf = llama_vocab_fim_mid = llama_vocab_eot
llama_vocab_fim_pad = llama_vocab_fim_rep = llama_vocab_fim_sep = llama_vocab_eot


def llama_vocab_get_add_bos(vocab: int) -> bool:
    v = _llama(vocab, _VOCAB)._vocab
    return bool(v is not None and v.add_bos)


def llama_vocab_get_add_eos(vocab: int) -> bool:
    v = _llama(vocab, _VOCAB)._vocab
    return bool(v is not None and v.add_eos)


def llama_vocab_get_add_sep(vocab: int) -> bool:
    _llama(vocab, _VOCAB)
    return False


# the names before llama.cpp's vocab split (they took the model; either handle works)
llama_token_get_text, llama_token_get_score = llama_vocab_get_text, llama_vocab_get_score
llama_token_get_attr, llama_token_is_eog, llama_token_is_control = (
    llama_vocab_get_attr,
    llama_vocab_is_eog,
    llama_vocab_is_control,
)
llama_token_bos, llama_token_eos, llama_token_eot = llama_vocab_bos, llama_vocab_eos, llama_vocab_eot
llama_token_cls = llama_token_sep = llama_token_fim_pre = llama_token_fim_suf = llama_vocab_eot
llama_token_fim_mid = llama_token_fim_pad = llama_token_fim_rep = llama_token_fim_sep = llama_vocab_eot
llama_token_nl, llama_token_pad = llama_vocab_nl, llama_vocab_pad
llama_add_bos_token, llama_add_eos_token = llama_vocab_get_add_bos, llama_vocab_get_add_eos


def _limit(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= INT32_MAX:
        raise ValueError(f"{what} must be an integer in [0, {INT32_MAX}], got {n!r}")
    return n


def llama_tokenize(
    vocab: int,
    text: Any,
    text_len: int,
    tokens: Any,
    n_tokens_max: int,
    add_special: bool,
    parse_special: bool,
) -> int:
    """Tokenize text[:text_len] into `tokens` (a ctypes int32 array of at least n_tokens_max); returns the count,
    or minus the count needed when n_tokens_max is too small (nothing written)."""
    tok = _vocab(vocab)._require_vocab()
    n_max = _limit(n_tokens_max, "n_tokens_max")
    cbuffers.check_writable(tokens, n_max, 4, "tokens")
    data = cbuffers.read_bytes(text, text_len, "text")
    ids = tok.tokenize(data, add_bos=bool(add_special), special=bool(parse_special))
    if len(ids) > n_max:
        return -len(ids) if len(ids) <= INT32_MAX else -INT32_MAX - 1
    cbuffers.write_int32(tokens, n_max, ids, "tokens")
    return len(ids)


def llama_token_to_piece(vocab: int, token: int, buf: Any, length: int, lstrip: int, special: bool) -> int:
    """The bytes of `token` into buf (no NUL); control tokens only with `special`; up to `lstrip` leading spaces
    skipped. Returns the byte count, or minus it when `length` is too small (nothing written)."""
    llm = _vocab(vocab)
    length = _limit(length, "length")
    cbuffers.check_writable(buf, length, 1, "buf")
    piece = llm._require_vocab().piece(_token(llm, token), special=bool(special))
    strip = _limit(lstrip, "lstrip")
    while strip > 0 and piece[:1] == b" ":
        piece, strip = piece[1:], strip - 1
    if len(piece) > length:
        return -len(piece)
    cbuffers.write_bytes(buf, length, piece, "buf")
    return len(piece)


def llama_detokenize(
    vocab: int,
    tokens: Any,
    n_tokens: int,
    text: Any,
    text_len_max: int,
    remove_special: bool,
    unparse_special: bool,
) -> int:
    """The text of tokens[:n_tokens] into `text`; returns its byte count, or minus it when text_len_max is too
    small (nothing written). remove_special drops a leading BOS / trailing EOS the vocabulary adds."""
    llm = _vocab(vocab)
    n_max = _limit(text_len_max, "text_len_max")
    cbuffers.check_writable(text, n_max, 1, "text")
    ids = check_token_ids(cbuffers.read_int32(tokens, n_tokens, "tokens"), llm.n_vocab())
    v = llm._vocab
    if remove_special and ids and v.add_bos and ids[0] == v.bos_id:
        ids = ids[1:]
    if remove_special and ids and v.add_eos and ids[-1] == v.eos_id:
        ids = ids[:-1]
    data = llm._require_vocab().detokenize(ids, special=bool(unparse_special))
    if len(data) > n_max:
        return -len(data)
    cbuffers.write_bytes(text, n_max, data, "text")
    return len(data)


# ------------------------------------------------------------------------------------------------ contexts
def llama_init_from_model(model: int, params: llama_context_params | None = None) -> int | None:
    """A context over `model` (a Llama of its own over the model's file): its handle, or None (and the reason
    logged) if it cannot be made, as llama.cpp. n_ctx 0 means the model's training context."""
    from ..llama import Llama

    llm = _llama(model, _MODEL)
    p = params if params is not None else llama_context_default_params()
    if int(p.n_seq_max) > 1:
        raise ValueError(f"n_seq_max={p.n_seq_max}: {ONE_SEQUENCE}")
    if bool(p.embeddings):
        raise ValueError("embeddings=True: llama-dsv4's low-level contexts return logits; use Llama.embed()")
    load = getattr(llm, "_lowlevel_load", {"use_mmap": llm.model_params.use_mmap, "use_mlock": False})
    try:
        ctx = Llama(
            llm.model_path,
            n_ctx=int(p.n_ctx),
            n_batch=max(int(p.n_batch), 1),
            n_ubatch=max(int(p.n_ubatch), 1),
            n_threads=int(p.n_threads) if p.n_threads > 0 else None,
            n_threads_batch=int(p.n_threads_batch) if p.n_threads_batch > 0 else None,
            flash_attn=int(p.flash_attn_type) == C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            type_k=int(p.type_k),
            rope_freq_base=float(p.rope_freq_base),
            verbose=False,
            device=llm._init_kwargs.get("device", "auto"),
            **load,
        )
    except ValueError as e:
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_init_from_model: failed to create the context: {e}")
        return None
    return register(ctx, "context", model=int(model))


llama_new_context_with_model = llama_init_from_model


def llama_free(ctx: int) -> None:
    """Free a context from llama_init_from_model."""
    release(ctx, _CTX).close()


def llama_get_model(ctx: int) -> int:
    entry, llm = resolve(ctx, _CTX)
    return entry.model if entry.model is not None else handle_of(llm, "model")


def llama_get_memory(ctx: int) -> int:
    return handle_of(_llama(ctx, _CTX), "memory")


def llama_n_ctx(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_ctx())


llama_n_ctx_seq = llama_n_ctx


def llama_n_batch(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_batch)


def llama_n_ubatch(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_ubatch)


def llama_n_seq_max(ctx: int) -> int:
    _llama(ctx, _CTX)
    return 1


def llama_n_threads(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_threads)


def llama_n_threads_batch(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_threads_batch)


def llama_set_n_threads(ctx: int, n_threads: int, n_threads_batch: int) -> None:
    """Threads for single-token and batch computes (at most the usable CPUs, as `Llama` fits them)."""
    llm = _llama(ctx, _CTX)
    llm.n_threads = fit_count("n_threads", n_threads, llm.n_threads)[0]
    llm.n_threads_batch = fit_count("n_threads_batch", n_threads_batch, llm.n_threads_batch)[0]


def llama_pooling_type(ctx: int) -> int:
    _llama(ctx, _CTX)
    return C.LLAMA_POOLING_TYPE_NONE


# ------------------------------------------------------------------------------------------------ batches
_MAX_BATCH_BYTES = 1 << 40  # of address space (untouched pages cost no memory)


def llama_batch_init(n_tokens: int, embd: int, n_seq_max: int) -> llama_batch:
    """A batch with room for n_tokens tokens, each in up to n_seq_max sequences; free it with llama_batch_free.
    Its arrays are one anonymous mapping, so room that is never written takes no memory."""
    if embd:
        raise ValueError(f"embd={embd}: llama-dsv4 decodes token ids; batches of embeddings are not supported")
    n = _limit(n_tokens, "n_tokens")
    n_seq = _limit(n_seq_max, "n_seq_max")
    if n == 0 or n_seq == 0:
        raise ValueError(f"llama_batch_init needs n_tokens > 0 and n_seq_max > 0, got {n_tokens} and {n_seq_max}")
    seq_off = -(-n * 13 // 8) * 8  # token, pos, n_seq_id (int32) and logits (int8), then the seq_id pointers
    size = seq_off + 8 * n + 4 * n * n_seq
    if size > _MAX_BATCH_BYTES:
        raise ValueError(f"llama_batch_init({n_tokens}, 0, {n_seq_max}) would take {size / (1 << 30):.0f} GiB")
    try:
        block = mmap.mmap(-1, size)
    except (OSError, ValueError) as e:
        raise ValueError(f"llama_batch_init({n_tokens}, 0, {n_seq_max}): cannot map {size} bytes: {e}") from None
    raw = (ctypes.c_char * size).from_buffer(block)
    base = ctypes.addressof(raw)
    b = llama_batch()
    b.token = ctypes.cast(base, ctypes.POINTER(ctypes.c_int32))
    b.pos = ctypes.cast(base + 4 * n, ctypes.POINTER(ctypes.c_int32))
    b.n_seq_id = ctypes.cast(base + 8 * n, ctypes.POINTER(ctypes.c_int32))
    b.logits = ctypes.cast(base + 12 * n, ctypes.POINTER(ctypes.c_int8))
    rows = base + seq_off + 8 * n
    np.frombuffer(block, np.uint64, n, seq_off)[:] = rows + 4 * n_seq * np.arange(n, dtype=np.uint64)
    b.seq_id = ctypes.cast(base + seq_off, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
    b._dsv4_room = (n, n_seq)
    b._dsv4_block = (block, raw)  # the mapping lives as long as the batch (or until llama_batch_free)
    return b


def llama_batch_free(batch: llama_batch) -> None:
    """Release a batch of llama_batch_init (its pointers become NULL; freeing twice does nothing)."""
    if not isinstance(batch, llama_batch):
        raise TypeError(f"batch must be a llama_batch, got {type(batch).__name__}")
    batch.token = batch.pos = batch.n_seq_id = batch.logits = batch.embd = None
    batch.seq_id = None
    batch.n_tokens = 0
    vars(batch).pop("_dsv4_room", None)
    vars(batch).pop("_dsv4_block", None)


def llama_batch_get_one(tokens: Any, n_tokens: int) -> llama_batch:
    """A batch of the caller's tokens for sequence 0, at the positions that continue it, with the last token's
    logits (the other arrays NULL)."""
    n = _limit(n_tokens, "n_tokens")
    if isinstance(tokens, (ctypes.Array, ctypes._Pointer)):  # type: ignore[attr-defined]
        if isinstance(tokens, ctypes.Array) and n > len(tokens):
            raise ValueError(f"n_tokens ({n}) is beyond the {len(tokens)} tokens given")
        arr: Any = tokens
    else:
        values = cbuffers.read_int32(tokens, n, "tokens")
        arr = (ctypes.c_int32 * max(n, 1))(*values)
    b = llama_batch()
    b.n_tokens = n
    b.token = ctypes.cast(arr, ctypes.POINTER(ctypes.c_int32))
    if isinstance(arr, ctypes.Array):
        b._dsv4_room = (len(arr), 1)
    return b


def _batch_tokens(b: llama_batch, n_past: int) -> tuple[list[int], list[bool]]:
    """The tokens of a batch and which of them want logits, after checking the batch against our limits."""
    n = int(b.n_tokens)
    room = vars(b).get("_dsv4_room")
    if n <= 0:
        raise ValueError(f"llama_decode: batch.n_tokens must be positive, got {n}")
    if room is not None and n > room[0]:
        raise ValueError(f"llama_decode: batch.n_tokens ({n}) is beyond the batch's room ({room[0]} tokens)")
    if not b.token:
        what = "a batch of embeddings is not supported" if b.embd else "batch.token is NULL"
        raise ValueError(f"llama_decode: {what}")
    tokens = list(b.token[:n])
    if b.pos:
        pos = list(b.pos[:n])
        if pos != list(range(n_past, n_past + n)):
            bad = next(i for i in range(n) if pos[i] != n_past + i)
            raise ValueError(
                f"llama_decode: batch.pos[{bad}] = {pos[bad]}, expected {n_past + bad}: positions must continue the "
                f"sequence, which holds {n_past} tokens (remove the rest first with llama_memory_seq_rm)"
            )
    if b.seq_id:
        counts = list(b.n_seq_id[:n]) if b.n_seq_id else [1] * n
        for i, k in enumerate(counts):
            if k < 1 or (room is not None and k > room[1]):
                raise ValueError(f"llama_decode: batch.n_seq_id[{i}] = {k} is outside [1, n_seq_max]")
            row = b.seq_id[i]
            if not row:
                raise ValueError(f"llama_decode: batch.seq_id[{i}] is NULL")
            ids = list(row[:k])
            if any(s != 0 for s in ids):
                raise ValueError(f"llama_decode: token {i} is in sequence(s) {ids}: {ONE_SEQUENCE}")
    flags = [bool(v) for v in b.logits[:n]] if b.logits else [False] * (n - 1) + [True]
    return tokens, flags


class _Outputs:
    """A context's logits from its last decode: rows for the batch indices that asked for them. The buffer grows
    and is never handed back while the context lives, so a pointer from llama_get_logits stays readable."""

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []
        self.n_rows = 0
        self.row_of: dict[int, int] = {}

    def store(self, rows: np.ndarray, indices: list[int]) -> None:
        need = rows.shape[0] * rows.shape[1]
        if not self.buffers or self.buffers[-1].size < max(need, 1):
            have = self.buffers[-1].size if self.buffers else 0
            self.buffers.append(np.zeros(max(need, 2 * have, rows.shape[1]), np.float32))
        self.buffers[-1][:need] = rows.reshape(-1)
        self.n_rows = rows.shape[0]
        self.row_of = {b: r for r, b in enumerate(indices)}


def llama_decode(ctx: int, batch: llama_batch) -> int:
    """Evaluate a batch after the tokens the context holds: 0 on success, 1 when the context has no room for it
    (nothing evaluated), as llama.cpp. Logits of the tokens whose batch.logits flag is set are kept for
    llama_get_logits / llama_get_logits_ith until the next decode."""
    entry, llm = resolve(ctx, _CTX)
    if not isinstance(batch, llama_batch):
        raise TypeError(f"batch must be a llama_batch, got {type(batch).__name__}")
    with llm._serial(), llm._engine_lock:
        engine = llm._context()
        n_past = llm.n_tokens
        tokens, flags = _batch_tokens(batch, n_past)
        if len(tokens) > llm.n_batch:
            raise ValueError(
                f"llama_decode: batch.n_tokens ({len(tokens)}) is beyond the context's n_batch ({llm.n_batch})"
            )
        tokens = check_token_ids(tokens, llm.n_vocab())
        if n_past + len(tokens) > llm.n_ctx():
            log(
                C.GGML_LOG_LEVEL_WARN,
                f"llama_decode: {n_past} + {len(tokens)} tokens do not fit in n_ctx {llm.n_ctx()}",
            )
            return 1
        llm._sync_context()
        wanted = [i for i, f in enumerate(flags) if f]
        logits = llm._append(engine, tokens, all_logits=any(flags[:-1]))
        # every token's row, or the last token's only
        rows = logits[wanted] if logits.shape[0] == len(tokens) else logits[-1:] if flags[-1] else logits[:0]
        if entry.state is None:
            entry.state = _Outputs()
        entry.state.store(rows, wanted)
    return 0


def llama_encode(ctx: int, batch: llama_batch) -> int:
    _llama(ctx, _CTX)
    raise ValueError("llama_encode: deepseek4 is a decoder-only model (no encoder); use llama_decode")


def _outputs(ctx: Any) -> tuple[_Outputs, int]:
    entry, llm = resolve(ctx, _CTX)
    if entry.state is None:
        raise ValueError("no logits: this context has not decoded a batch (llama_decode) yet")
    return entry.state, llm.n_vocab()


def llama_get_logits(ctx: int) -> Any:
    """POINTER(c_float) to the logits of the last decode: one row of n_vocab floats per token whose batch.logits
    flag was set, in batch order."""
    out, _ = _outputs(ctx)
    return out.buffers[-1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def llama_get_logits_ith(ctx: int, i: int) -> Any:
    """POINTER(c_float) to the logits of batch token `i` (which must have asked for them); a negative i counts
    outputs from the end (-1: the last output)."""
    out, n_vocab = _outputs(ctx)
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"i must be an integer, got {type(i).__name__}")
    row = (out.n_rows + i if -out.n_rows <= i < 0 else None) if i < 0 else out.row_of.get(i)
    if row is None:
        raise ValueError(
            f"llama_get_logits_ith: no logits for index {i} (the last decode has {out.n_rows} outputs, at batch "
            f"indices {sorted(out.row_of)[:8]}{'...' if len(out.row_of) > 8 else ''})"
        )
    return out.buffers[-1][row * n_vocab :].ctypes.data_as(ctypes.POINTER(ctypes.c_float))


# ------------------------------------------------------------------------------------------------ memory (the cache)
def _seq(seq_id: Any, any_ok: bool) -> int:
    if isinstance(seq_id, bool) or not isinstance(seq_id, int):
        raise TypeError(f"seq_id must be an integer, got {type(seq_id).__name__}")
    if seq_id == 0 or (any_ok and seq_id < 0):
        return seq_id
    raise ValueError(f"seq_id {seq_id}: {ONE_SEQUENCE}")


def llama_memory_clear(mem: int, data: bool = True) -> None:
    """Forget the whole sequence."""
    _llama(mem, _MEM).reset()


def llama_memory_seq_rm(mem: int, seq_id: int, p0: int, p1: int) -> bool:
    """Remove positions [p0, p1) (p0 < 0: from 0; p1 < 0: to the end) of sequence 0 (seq_id 0 or -1). Cutting
    the end off works (the next decode re-evaluates the kept prefix: our engine's compressed state cannot be cut);
    removing a part that the sequence continues after returns False, as llama.cpp does for a cache that cannot."""
    llm = _llama(mem, _MEM)
    _seq(seq_id, any_ok=True)
    n = llm.n_tokens
    start = max(int(p0), 0)
    end = n if int(p1) < 0 else int(p1)
    if start >= min(end, n):
        return True  # nothing held there
    if end < n:
        return False
    with llm._serial():
        llm.n_tokens = start
    return True


def llama_memory_seq_pos_min(mem: int, seq_id: int) -> int:
    _seq(seq_id, any_ok=False)
    return 0 if _llama(mem, _MEM).n_tokens else -1


def llama_memory_seq_pos_max(mem: int, seq_id: int) -> int:
    _seq(seq_id, any_ok=False)
    return int(_llama(mem, _MEM).n_tokens) - 1


def llama_memory_seq_keep(mem: int, seq_id: int) -> None:
    _llama(mem, _MEM)
    _seq(seq_id, any_ok=False)  # keeping sequence 0, the only one, changes nothing


def llama_memory_seq_cp(mem: int, seq_id_src: int, seq_id_dst: int, p0: int, p1: int) -> None:
    _llama(mem, _MEM)
    _seq(seq_id_src, any_ok=False)
    _seq(seq_id_dst, any_ok=False)  # copying sequence 0 onto itself changes nothing


def llama_memory_seq_add(mem: int, seq_id: int, p0: int, p1: int, delta: int) -> None:
    _llama(mem, _MEM)
    raise ValueError("llama-dsv4 cannot shift positions in its context (llama_memory_can_shift is False)")


def llama_memory_seq_div(mem: int, seq_id: int, p0: int, p1: int, d: int) -> None:
    llama_memory_seq_add(mem, seq_id, p0, p1, 0)


def llama_memory_can_shift(mem: int) -> bool:
    _llama(mem, _MEM)
    return False


# the KV-cache names of llama-cpp-python before 0.3.10 (they take the context)
llama_kv_self_clear = llama_kv_cache_clear = llama_memory_clear
llama_kv_self_seq_rm = llama_kv_cache_seq_rm = llama_memory_seq_rm
llama_kv_self_seq_keep = llama_kv_cache_seq_keep = llama_memory_seq_keep
llama_kv_self_seq_cp = llama_kv_cache_seq_cp = llama_memory_seq_cp
llama_kv_self_seq_pos_max = llama_kv_cache_seq_pos_max = llama_memory_seq_pos_max
llama_kv_self_seq_pos_min = llama_memory_seq_pos_min
llama_kv_self_can_shift = llama_kv_cache_can_shift = llama_memory_can_shift


# ------------------------------------------------------------------------------------------------ _lib
_TOKENIZE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int32,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_bool,
    ctypes.c_bool,
)


def _c_tokenize(vocab: Any, text: Any, text_len: int, tokens: Any, n_max: int, add: bool, parse: bool) -> int:
    try:
        return llama_tokenize(vocab, text or 0, text_len, tokens or 0, n_max, add, parse)
    except Exception as e:  # a C caller cannot receive an exception: say why, and return no tokens
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_tokenize (C callback): {type(e).__name__}: {e}")
        return 0


class _Lib:
    """`llama_cpp.llama_cpp._lib`: the functions a C caller may need by address. llguidance's llama.cpp tokenizer
    takes `_lib.llama_tokenize` and calls it from Rust; it is our llama_tokenize behind a C function pointer."""

    llama_tokenize = _TOKENIZE_FN(_c_tokenize)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"llama-dsv4 has no C library: _lib.{name} does not exist (the low-level functions are in llama_cpp)"
        )


_lib = _Lib()

__all__ += [n for n in list(globals()) if n.startswith("llama_") and callable(globals()[n])]
