"""The low-level API with several sequences in one context (n_seq_max > 1), as llama.cpp's batched and parallel
examples drive it: a batch mixing the tokens of several sequences, a prompt shared by several sequences (tokens in
several of them, or llama_memory_seq_cp), per-sequence memory calls, and n_ctx shared as llama.cpp shares it.
Each sequence gets the tokens it gets alone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from llama_dsv4.compat.lowlevel_api import lowlevel_module
from llama_dsv4.model.writer import write_model

L = lowlevel_module()
N_SEQ = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    path = write_model(os.path.join(tmp_path_factory.mktemp("llms"), "tiny-f32.gguf"), dtype="f32")[0]
    h = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    assert h is not None
    yield h
    L.llama_model_free(h)


def context(model: int, n_ctx: int, n_seq: int = N_SEQ, unified: bool = False, n_batch: int = 64) -> int:
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = n_ctx, n_batch, 16, n_seq, unified
    p.n_threads = p.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, p)
    assert ctx is not None
    return ctx


def fill(batch: Any, items: list[tuple[int, int, list[int], bool]]) -> None:
    """items: (token, position, sequences, wants logits)."""
    for i, (t, pos, seqs, want) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, len(seqs), want
        for k, s in enumerate(seqs):
            batch.seq_id[i][k] = s
    batch.n_tokens = len(items)


def row(ctx: int, i: int, n_vocab: int) -> np.ndarray:
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()


def alone(model: int, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of `prompt` on a context of one sequence."""
    ctx = context(model, 128, n_seq=1)
    b = L.llama_batch_init(64, 0, 1)
    nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    try:
        fill(b, [(t, p, [0], p == len(prompt) - 1) for p, t in enumerate(prompt)])
        assert L.llama_decode(ctx, b) == 0
        out = [int(row(ctx, len(prompt) - 1, nv).argmax())]
        for k in range(n - 1):
            fill(b, [(out[-1], len(prompt) + k, [0], True)])
            assert L.llama_decode(ctx, b) == 0
            out.append(int(row(ctx, 0, nv).argmax()))
        return out
    finally:
        L.llama_batch_free(b)
        L.llama_free(ctx)


def test_a_batch_of_several_sequences_gives_each_its_own_tokens(model: int) -> None:
    """Three prompts of different lengths in one batch (seq 0, 1, 2), then one token per sequence per batch:
    each greedy continuation equals its prompt's alone (tiny f32 model: mixed ubatches are bit-identical)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, n).tolist() for n in (5, 9, 14)]
    want = [alone(model, p, 6) for p in prompts]
    ctx = context(model, 3 * 64)
    assert L.llama_n_seq_max(ctx) == 3 and L.llama_n_ctx(ctx) == 192 and L.llama_n_ctx_seq(ctx) == 64
    nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    b = L.llama_batch_init(64, 0, N_SEQ)
    try:
        items = [(t, p, [s], p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        fill(b, items)  # 28 tokens, 16 per ubatch: two steps, the sequences split across them
        assert L.llama_decode(ctx, b) == 0
        last = [sum(len(p) for p in prompts[: s + 1]) - 1 for s in range(N_SEQ)]
        got = [[int(row(ctx, i, nv).argmax())] for i in last]
        for k in range(5):
            fill(b, [(got[s][-1], len(prompts[s]) + k, [s], True) for s in range(N_SEQ)])
            assert L.llama_decode(ctx, b) == 0
            for s in range(N_SEQ):
                got[s].append(int(row(ctx, s, nv).argmax()))
        assert got == want
        mem = L.llama_get_memory(ctx)
        assert [L.llama_memory_seq_pos_max(mem, s) for s in range(N_SEQ)] == [len(p) + 4 for p in prompts]
    finally:
        L.llama_batch_free(b)
        L.llama_free(ctx)


def test_a_shared_prompt_by_token_sequences_and_by_seq_cp(model: int) -> None:
    """A prompt evaluated once for three sequences (each token in sequences 0, 1, 2) and a prompt evaluated on
    sequence 0 and copied with llama_memory_seq_cp give the same logits as the prompt alone; the sequences then go
    on separately (different next tokens), and seq_rm / seq_keep / clear act on the sequences they name."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(5, 200, 11).tolist()
    nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    ref = alone(model, prompt, 1)[0]
    b = L.llama_batch_init(64, 0, N_SEQ)
    for how in ("shared tokens", "seq_cp"):
        ctx = context(model, 3 * 64)
        mem = L.llama_get_memory(ctx)
        try:
            if how == "shared tokens":
                fill(b, [(t, p, [0, 1, 2], p == len(prompt) - 1) for p, t in enumerate(prompt)])
                assert L.llama_decode(ctx, b) == 0
            else:
                fill(b, [(t, p, [0], p == len(prompt) - 1) for p, t in enumerate(prompt)])
                assert L.llama_decode(ctx, b) == 0
                for s in (1, 2):
                    L.llama_memory_seq_cp(mem, 0, s, -1, -1)
            assert int(row(ctx, len(prompt) - 1, nv).argmax()) == ref
            assert [L.llama_memory_seq_pos_max(mem, s) for s in range(N_SEQ)] == [len(prompt) - 1] * 3
            # three different next tokens: three different continuations, each as that text alone
            nxt = [ref, (ref + 1) % nv, (ref + 2) % nv]
            fill(b, [(nxt[s], len(prompt), [s], True) for s in range(N_SEQ)])
            assert L.llama_decode(ctx, b) == 0
            for s in range(N_SEQ):
                assert int(row(ctx, s, nv).argmax()) == alone(model, [*prompt, nxt[s]], 1)[0]
            L.llama_memory_seq_rm(mem, 1, 4, -1)
            L.llama_memory_seq_keep(mem, 1)
            assert [L.llama_memory_seq_pos_max(mem, s) for s in range(N_SEQ)] == [-1, 3, -1]
            L.llama_memory_seq_cp(mem, 1, 2, 0, 2)  # a prefix of a sequence
            assert L.llama_memory_seq_pos_max(mem, 2) == 1
            fill(b, [(prompt[2], 2, [2], True)])
            assert L.llama_decode(ctx, b) == 0
            assert int(row(ctx, 0, nv).argmax()) == alone(model, prompt[:3], 1)[0]
            L.llama_memory_clear(mem, True)
            assert [L.llama_memory_seq_pos_max(mem, s) for s in range(N_SEQ)] == [-1, -1, -1]
        finally:
            L.llama_free(ctx)
    L.llama_batch_free(b)


def test_shared_context_limits_and_errors(model: int) -> None:
    """n_ctx split among the sequences, or shared with kv_unified (a batch beyond what is left: 1, nothing
    evaluated); a sequence id the context does not hold, a position that does not continue its sequence, a copy
    from the middle: ValueErrors that say so."""
    b = L.llama_batch_init(64, 0, N_SEQ)
    ctx = context(model, 96)  # 32 per sequence
    mem = L.llama_get_memory(ctx)
    try:
        assert L.llama_n_ctx(ctx) == 96 and L.llama_n_ctx_seq(ctx) == 32 and L.llama_n_batch(ctx) == 64
        fill(b, [(7, p, [1], p == 32) for p in range(33)])
        assert L.llama_decode(ctx, b) == 1  # 33 positions in a sequence of 32
        assert L.llama_memory_seq_pos_max(mem, 1) == -1
        fill(b, [(7, 0, [3], True)])
        with pytest.raises(ValueError, match=r"sequence\(s\) \[3\]: this context holds sequences 0 \.\. 2"):
            L.llama_decode(ctx, b)
        fill(b, [(7, 0, [0], False), (8, 2, [0], True)])
        with pytest.raises(ValueError, match=r"batch.pos\[1\] = 2, expected 1.*sequence 0"):
            L.llama_decode(ctx, b)
        fill(b, [(7, 0, [1, 1], True)])
        with pytest.raises(ValueError, match="names a sequence twice"):
            L.llama_decode(ctx, b)
        with pytest.raises(ValueError, match=r"seq_id 5: this context holds sequences 0 \.\. 2"):
            L.llama_memory_seq_rm(mem, 5, 0, -1)
        with pytest.raises(ValueError, match="copies a sequence from its start"):
            L.llama_memory_seq_cp(mem, 0, 1, 3, -1)
    finally:
        L.llama_free(ctx)
    ctx = context(model, 40, unified=True, n_batch=32)  # each up to 40, all within 40
    mem = L.llama_get_memory(ctx)
    try:
        assert L.llama_n_ctx(ctx) == 40 and L.llama_n_ctx_seq(ctx) == 40
        fill(b, [(7, p, [0], p == 29) for p in range(30)])
        assert L.llama_decode(ctx, b) == 0
        fill(b, [(7, p, [1], p == 10) for p in range(11)])
        assert L.llama_decode(ctx, b) == 1  # 30 + 11 > 40
        assert L.llama_memory_seq_pos_max(mem, 1) == -1
        fill(b, [(7, p, [1], p == 9) for p in range(10)])
        assert L.llama_decode(ctx, b) == 0
        L.llama_memory_seq_rm(mem, 0, 20, -1)  # room again
        fill(b, [(7, 10 + p, [1], p == 9) for p in range(10)])
        assert L.llama_decode(ctx, b) == 0
    finally:
        L.llama_free(ctx)
        L.llama_batch_free(b)
