"""Contexts of the low-level API (lowlevel.py says how it maps onto llama-dsv4): a context is a `Llama`
(llama_init_from_model makes one; `Llama.ctx` is one's own), llama_batch_init / llama_batch_get_one / llama_decode
append to its sequence through `Sequence.decode`, llama_get_logits(_ith) read the outputs of the last decode, and the
llama_memory_* functions (and the older llama_kv_cache_* / llama_kv_self_* names) work on its sequences (one, or
n_seq_max: a batch of several sequences is evaluated in shared ubatches, sequence.decode_together)."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

import numpy as np

from ..engine.cpus import fit_count
from ..tokenizer import check_token_ids
from . import cbuffers
from . import constants as C
from .cbuffers import as_int
from .handles import handle_of, register, release, resolve
from .lowlevel import _CTX, _MEM, _MODEL, ONE_SEQUENCE, _limit, _llama, log
from .lowlevel_types import llama_batch, llama_context_default_params, llama_context_params

MAX_SEQUENCES = 256  # n_seq_max's bound (the engine's)


def llama_init_from_model(model: int, params: llama_context_params | None = None) -> int | None:
    """A context over `model` (a Llama of its own over the model's file): its handle, or None (and the reason
    logged) if it cannot be made, as llama.cpp. n_ctx 0 means the model's training context. With n_seq_max > 1
    it holds that many sequences (seq_id 0 .. n_seq_max - 1, `Llama.slot`), which share n_ctx as llama.cpp's:
    split evenly, or with kv_unified each up to n_ctx and all of them together within it."""
    from ..llama import Llama

    llm = _llama(model, _MODEL)
    p = params if params is not None else llama_context_default_params()
    n_seq = int(p.n_seq_max)
    if not 1 <= n_seq <= MAX_SEQUENCES:
        raise ValueError(f"n_seq_max must be between 1 and {MAX_SEQUENCES}, got {n_seq}")
    if bool(p.embeddings):
        raise ValueError("embeddings=True: llama-dsv4's low-level contexts return logits; use Llama.embed()")
    load = getattr(llm, "_lowlevel_load", {"use_mmap": llm.model_params.use_mmap, "use_mlock": False})
    from .lowlevel_model import llama_model_n_ctx_train

    total = int(p.n_ctx) if int(p.n_ctx) > 0 else llama_model_n_ctx_train(model)
    unified = n_seq > 1 and bool(p.kv_unified)
    per_seq = total if n_seq == 1 or unified else total // n_seq
    if per_seq < 1:
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_init_from_model: n_ctx {total} is less than one position per sequence")
        return None
    try:
        ctx = Llama(
            llm.model_path,
            n_ctx=per_seq,
            n_batch=max(int(p.n_batch), 1),
            n_ubatch=max(int(p.n_ubatch), 1),
            n_seq_max=n_seq,
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
    ctx._lowlevel_shared = total if unified else None  # the positions all sequences hold together (kv_unified)
    ctx._lowlevel_n_batch = max(1, min(int(p.n_batch), total))  # a batch's tokens, all sequences together
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
    """The context's positions, all sequences together (as llama.cpp)."""
    llm = _llama(ctx, _CTX)
    shared = getattr(llm, "_lowlevel_shared", None)
    return int(shared) if shared is not None else int(llm.n_ctx()) * int(llm.n_seq_max)


def llama_n_ctx_seq(ctx: int) -> int:
    """The positions one sequence may hold."""
    return int(_llama(ctx, _CTX).n_ctx())


def llama_n_batch(ctx: int) -> int:
    llm = _llama(ctx, _CTX)
    return int(getattr(llm, "_lowlevel_n_batch", llm.n_batch))


def llama_n_ubatch(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_ubatch)


def llama_n_seq_max(ctx: int) -> int:
    return int(_llama(ctx, _CTX).n_seq_max)


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


def _holds(n_seq: int) -> str:
    return ONE_SEQUENCE if n_seq == 1 else f"this context holds sequences 0 .. {n_seq - 1} (n_seq_max = {n_seq})"


def _batch_tokens(b: llama_batch, n_seq: int, n_past: Any) -> tuple[list[int], list[bool], list[list[int]]]:
    """The tokens of a batch, which of them want logits and each one's sequences, after checking the batch
    against our limits: sequences of the context, positions that continue each sequence (`n_past(seq_id)`)."""
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
    seqs: list[list[int]] = [[0]] * n
    if b.seq_id:
        counts = list(b.n_seq_id[:n]) if b.n_seq_id else [1] * n
        for i, k in enumerate(counts):
            if k < 1 or (room is not None and k > room[1]):
                raise ValueError(f"llama_decode: batch.n_seq_id[{i}] = {k} is outside [1, n_seq_max]")
            row = b.seq_id[i]
            if not row:
                raise ValueError(f"llama_decode: batch.seq_id[{i}] is NULL")
            ids = list(row[:k])
            bad = [s for s in ids if not 0 <= s < n_seq]
            if bad:
                raise ValueError(f"llama_decode: token {i} is in sequence(s) {ids}: {_holds(n_seq)}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"llama_decode: token {i} names a sequence twice: {ids}")
            seqs[i] = ids
    if b.pos:
        pos = list(b.pos[:n])
        nxt: dict[int, int] = {}
        for i in range(n):
            for s in seqs[i]:
                want = nxt.setdefault(s, n_past(s))
                if pos[i] != want:
                    raise ValueError(
                        f"llama_decode: batch.pos[{i}] = {pos[i]}, expected {want}: positions must continue the "
                        f"sequence {s}, which holds {n_past(s)} tokens (remove the rest first with "
                        "llama_memory_seq_rm)"
                    )
                nxt[s] = want + 1
    flags = [bool(v) for v in b.logits[:n]] if b.logits else [False] * (n - 1) + [True]
    return tokens, flags, seqs


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
    llama_get_logits / llama_get_logits_ith until the next decode. A batch may hold tokens of several sequences
    (a context with n_seq_max > 1), a token in several of them (a shared prompt): each sequence's tokens are
    evaluated after its own, all sequences in shared ubatches (continuous batching, docs/batching.md)."""
    entry, llm = resolve(ctx, _CTX)
    if not isinstance(batch, llama_batch):
        raise TypeError(f"batch must be a llama_batch, got {type(batch).__name__}")
    n_seq = int(llm.n_seq_max)
    if n_seq == 1:
        seq = llm.sequence
        with seq.lock.serial():
            seq.check_usable()
            tokens, flags, _ = _batch_tokens(batch, 1, lambda s: seq.n_tokens)
            return _decode_one(entry, llm, seq, tokens, flags)
    slots = [llm.slot(i) for i in range(n_seq)]
    llm.sequence.check_usable()
    tokens, flags, seqs = _batch_tokens(batch, n_seq, lambda s: slots[s].n_tokens)
    n_batch = int(getattr(llm, "_lowlevel_n_batch", llm.n_batch))
    if len(tokens) > n_batch:
        raise ValueError(f"llama_decode: batch.n_tokens ({len(tokens)}) is beyond the context's n_batch ({n_batch})")
    tokens = check_token_ids(tokens, llm.n_vocab())
    order: dict[int, list[int]] = {}  # sequence -> its batch indices, in batch order
    for i, ss in enumerate(seqs):
        for s in ss:
            order.setdefault(s, []).append(i)
    shared = getattr(llm, "_lowlevel_shared", None)
    held = sum(sl.n_tokens for sl in slots)
    for s, idx in order.items():
        if slots[s].n_tokens + len(idx) > llm.n_ctx():
            log(C.GGML_LOG_LEVEL_WARN, f"llama_decode: sequence {s} holds {slots[s].n_tokens} tokens, and "
                f"{len(idx)} more do not fit in its {llm.n_ctx()} positions")  # fmt: skip
            return 1
    if shared is not None and held + sum(len(v) for v in order.values()) > shared:
        log(C.GGML_LOG_LEVEL_WARN, f"llama_decode: the sequences hold {held} tokens and {len(tokens)} more do not "
            f"fit in n_ctx {shared} (kv_unified)")  # fmt: skip
        return 1
    from ..sequence import decode_together

    want_all = {s: any(flags[i] for i in idx[:-1]) for s, idx in order.items()}
    parts = [(slots[s].sequence, [tokens[i] for i in idx], want_all[s]) for s, idx in order.items()]
    out = dict(zip(order, decode_together(parts), strict=True))
    wanted = [i for i, f in enumerate(flags) if f]
    rows = []
    for i in wanted:
        s = seqs[i][0]
        j = order[s].index(i)
        rows.append(out[s][j] if want_all[s] else out[s][-1])
    if entry.state is None:
        entry.state = _Outputs()
    entry.state.store(np.stack(rows) if rows else np.zeros((0, llm.n_vocab()), np.float32), wanted)
    return 0


def _decode_one(entry: Any, llm: Any, seq: Any, tokens: list[int], flags: list[bool]) -> int:
    """llama_decode on a context of one sequence (its lock held)."""
    n_past, n_batch = seq.n_tokens, llm.n_batch
    if len(tokens) > n_batch:
        raise ValueError(f"llama_decode: batch.n_tokens ({len(tokens)}) is beyond the context's n_batch ({n_batch})")
    tokens = check_token_ids(tokens, llm.n_vocab())
    if n_past + len(tokens) > llm.n_ctx():
        log(C.GGML_LOG_LEVEL_WARN, f"llama_decode: {n_past} + {len(tokens)} tokens do not fit in n_ctx {llm.n_ctx()}")
        return 1
    wanted = [i for i, f in enumerate(flags) if f]
    logits = seq.decode(tokens, all_logits=any(flags[:-1]))
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
    i = as_int(i, "i")
    row = (out.n_rows + i if -out.n_rows <= i < 0 else None) if i < 0 else out.row_of.get(i)
    if row is None:
        raise ValueError(
            f"llama_get_logits_ith: no logits for index {i} (the last decode has {out.n_rows} outputs, at batch "
            f"indices {sorted(out.row_of)[:8]}{'...' if len(out.row_of) > 8 else ''})"
        )
    return out.buffers[-1][row * n_vocab :].ctypes.data_as(ctypes.POINTER(ctypes.c_float))


# ------------------------------------------------------------------------------------------------ memory (the cache)
def _slots(mem: int, seq_id: Any, any_ok: bool) -> list[Any]:
    """The Llamas of the sequences `seq_id` names: one, or every one for a negative id where `any_ok`."""
    llm = _llama(mem, _MEM)
    n_seq = int(llm.n_seq_max)
    seq_id = as_int(seq_id, "seq_id")
    if any_ok and seq_id < 0:
        return [llm.slot(i) for i in range(n_seq)]
    if not 0 <= seq_id < n_seq:
        raise ValueError(f"seq_id {seq_id}: {_holds(n_seq)}")
    return [llm.slot(seq_id)]


def llama_memory_clear(mem: int, data: bool = True) -> None:
    """Forget every sequence."""
    for sl in _slots(mem, -1, any_ok=True):
        sl.reset()


def llama_memory_seq_rm(mem: int, seq_id: int, p0: int, p1: int) -> bool:
    """Remove positions [p0, p1) (p0 < 0: from 0; p1 < 0: to the end) of a sequence (seq_id < 0: of every one).
    Cutting the end off works (the next decode re-evaluates what the compressed state lost: docs/batching.md);
    removing a part that the sequence continues after returns False, as llama.cpp does for a cache that cannot."""
    slots = _slots(mem, seq_id, any_ok=True)
    start = max(as_int(p0, "p0"), 0)
    p1 = as_int(p1, "p1")
    ok = True
    for llm in slots:
        n = llm.n_tokens
        end = n if p1 < 0 else p1
        if start >= min(end, n):
            continue  # nothing held there
        if end < n:
            ok = False
            continue
        with llm.sequence.lock.serial():
            llm.n_tokens = start
    return ok


def llama_memory_seq_pos_min(mem: int, seq_id: int) -> int:
    (llm,) = _slots(mem, seq_id, any_ok=False)
    return 0 if llm.n_tokens else -1


def llama_memory_seq_pos_max(mem: int, seq_id: int) -> int:
    (llm,) = _slots(mem, seq_id, any_ok=False)
    return int(llm.n_tokens) - 1


def llama_memory_seq_keep(mem: int, seq_id: int) -> None:
    """Forget every sequence but `seq_id`."""
    (keep,) = _slots(mem, seq_id, any_ok=False)
    for llm in _slots(mem, -1, any_ok=True):
        if llm is not keep:
            llm.reset()


def llama_memory_seq_cp(mem: int, seq_id_src: int, seq_id_dst: int, p0: int, p1: int) -> None:
    """Make sequence dst hold positions [0, p1) of sequence src (p1 < 0: all of them): a shared prompt evaluated
    once, then continued differently (the engine's state of src is copied, then cut as llama_memory_seq_rm does).
    What dst held is replaced. A copy that does not start at position 0 (p0 > 0) is a ValueError."""
    (src,) = _slots(mem, seq_id_src, any_ok=False)
    (dst,) = _slots(mem, seq_id_dst, any_ok=False)
    if as_int(p0, "p0") > 0:
        raise ValueError(f"llama_memory_seq_cp: p0 = {p0}: llama-dsv4 copies a sequence from its start (p0 <= 0)")
    p1 = as_int(p1, "p1")
    if src is dst:
        return
    n = src.n_tokens
    end = n if p1 < 0 else min(p1, n)
    dst.load_state(src.save_state())
    if end < n:
        with dst.sequence.lock.serial():
            dst.n_tokens = end


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


def llama_get_embeddings(ctx: int) -> None:
    """NULL, as llama.cpp for a context without embeddings: llama-dsv4's low-level contexts return logits (for
    embeddings use Llama.embed())."""
    _llama(ctx, _CTX)
    return None


def llama_get_embeddings_ith(ctx: int, i: int) -> None:
    return llama_get_embeddings(ctx)


def llama_get_embeddings_seq(ctx: int, seq_id: int) -> None:
    return llama_get_embeddings(ctx)


def llama_set_embeddings(ctx: int, embeddings: bool) -> None:
    _llama(ctx, _CTX)
    if embeddings:
        raise ValueError("llama-dsv4's low-level contexts return logits, not embeddings; use Llama.embed()")


def llama_set_causal_attn(ctx: int, causal_attn: bool) -> None:
    _llama(ctx, _CTX)
    if not causal_attn:
        raise ValueError("deepseek4 attends causally; non-causal attention is not supported")


def llama_set_warmup(ctx: int, warmup: bool) -> None:
    """Accepted; there is nothing to warm up."""
    _llama(ctx, _CTX)


__all__ = [n for n in list(globals()) if n.startswith("llama_") and callable(globals()[n])]
