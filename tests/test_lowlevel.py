"""llama-cpp-python's low-level API over our engine (llama_dsv4/compat/lowlevel.py, `llama_cpp.llama_cpp` under the
alias): tokenization into ctypes buffers, batches decoded with the logits of Llama.eval, the sequence cut back with
llama_memory_seq_rm, the sampler chain, `llama_cpp._internals`, and the errors where llama.cpp would crash."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from llama_dsv4 import Llama
from llama_dsv4.compat import internals
from llama_dsv4.compat.lowlevel_api import lowlevel_module

L = lowlevel_module()  # `llama_cpp.llama_cpp` under the alias

TEXT = b"Hello world, this is a test of the low-level API."


@pytest.fixture(scope="module")
def model(real_vocab_path: str) -> Iterator[int]:
    h = L.llama_model_load_from_file(real_vocab_path.encode(), L.llama_model_default_params())
    assert h is not None
    yield h
    L.llama_model_free(h)


@pytest.fixture(scope="module")
def reference(real_vocab_path: str) -> Iterator[Llama]:
    with Llama(real_vocab_path, n_ctx=64, n_batch=32, logits_all=True, verbose=False) as llm:
        yield llm


def _context(model: int, n_ctx: int = 64, n_batch: int = 32) -> int:
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
    ctx = L.llama_init_from_model(model, p)
    assert ctx is not None
    return ctx


def _tokens(vocab: int, text: bytes = TEXT) -> list[int]:
    buf = (ctypes.c_int32 * 64)()
    n = L.llama_tokenize(vocab, text, len(text), buf, 64, False, False)
    assert n > 0
    return list(buf[:n])


def _fill(batch: Any, tokens: list[int], first_pos: int, all_logits: bool, seq: int = 0) -> None:
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, first_pos + i, 1, all_logits
        batch.seq_id[i][0] = seq
    batch.logits[len(tokens) - 1] = True
    batch.n_tokens = len(tokens)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _logits(ctx: int, rows: int, n_vocab: int) -> np.ndarray:
    return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(rows, n_vocab)).copy()


def test_tokenize_round_trip(model: int, reference: Llama) -> None:
    vocab = L.llama_model_get_vocab(model)
    assert L.llama_vocab_n_tokens(vocab) == L.llama_n_vocab(vocab) == reference.n_vocab() == 129280
    ids = _tokens(vocab)
    assert ids == reference.tokenize(TEXT, add_bos=False)
    # too small: minus the count needed, nothing written
    small = (ctypes.c_int32 * 4)(*[-7] * 4)
    assert L.llama_tokenize(vocab, TEXT, len(TEXT), small, 4, False, False) == -len(ids)
    assert list(small) == [-7] * 4
    # a prefix of the text (text_len), and the old API's model handle in place of the vocab
    assert L.llama_tokenize(model, TEXT, 5, small, 4, False, False) == 1 and small[0] == ids[0]
    # pieces, one token at a time, and the whole text back
    buf = ctypes.create_string_buffer(32)
    pieces = b""
    for t in ids:
        n = L.llama_token_to_piece(vocab, t, buf, 32, 0, False)
        pieces += buf.raw[:n]
    assert pieces == TEXT
    assert L.llama_token_to_piece(vocab, ids[1], buf, 1, 0, False) == -len(b" world")
    assert L.llama_token_to_piece(vocab, ids[1], buf, 32, 1, False) == len(b"world") and buf.raw[:5] == b"world"
    arr = (ctypes.c_int32 * len(ids))(*ids)
    out = ctypes.create_string_buffer(128)
    assert (
        L.llama_detokenize(vocab, arr, len(ids), out, 128, False, False) == len(TEXT) and out.raw[: len(TEXT)] == TEXT
    )
    assert L.llama_detokenize(vocab, arr, len(ids), out, 3, False, False) == -len(TEXT)
    # a control token renders only with special
    eos = L.llama_vocab_eos(vocab)
    assert L.llama_vocab_is_eog(vocab, eos) and L.llama_vocab_is_control(vocab, eos)
    assert L.llama_token_to_piece(vocab, eos, buf, 32, 0, False) == 0
    n = L.llama_token_to_piece(vocab, eos, buf, 32, 0, True)
    assert buf.raw[:n] == L.llama_vocab_get_text(vocab, eos) == "<｜end▁of▁sentence｜>".encode()
    assert L.llama_vocab_get_attr(vocab, eos) & L.LLAMA_TOKEN_ATTR_CONTROL
    assert L.llama_vocab_get_attr(vocab, ids[0]) == L.LLAMA_TOKEN_ATTR_NORMAL
    # parse_special: the control token's text is one token, else plain text
    eos_text = "<｜end▁of▁sentence｜>".encode()
    assert L.llama_tokenize(vocab, eos_text, len(eos_text), small, 4, False, True) == 1 and small[0] == eos
    assert L.llama_tokenize(vocab, eos_text, len(eos_text), (ctypes.c_int32 * 32)(), 32, False, False) > 1


def test_model_queries(model: int, reference: Llama) -> None:
    assert L.llama_model_n_embd(model) == L.llama_n_embd(model) == reference.n_embd()
    assert L.llama_model_n_ctx_train(model) > 0 and L.llama_model_n_layer(model) > 0
    assert L.llama_model_size(model) > 0 and L.llama_model_n_params(model) > 0
    buf = ctypes.create_string_buffer(64)
    n = L.llama_model_desc(model, buf, 64)
    assert buf.value.startswith(b"deepseek4 ") and n == len(buf.value)
    n = L.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
    assert n == 9 and buf.value == b"deepseek4"
    assert L.llama_model_meta_val_str(model, b"no.such.key", buf, 64) == -1 and buf.value == b""
    short = ctypes.create_string_buffer(4)
    assert L.llama_model_meta_val_str(model, b"general.architecture", short, 4) == 9 and short.value == b"dee"
    keys = set()
    for i in range(L.llama_model_meta_count(model)):
        L.llama_model_meta_key_by_index(model, i, buf, 64)
        keys.add(buf.value)
    assert b"general.architecture" in keys
    assert L.llama_model_chat_template(model, None) == reference.metadata["tokenizer.chat_template"].encode()
    assert L.llama_model_chat_template(model, b"tool_use") is None
    assert not L.llama_model_has_encoder(model) and L.llama_model_has_decoder(model)


def test_batch_decode_logits_equal_eval(model: int, reference: Llama) -> None:
    vocab = L.llama_model_get_vocab(model)
    ids = _tokens(vocab)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    reference.reset()
    reference.eval(ids)
    want = reference.scores[: len(ids)]
    ctx = _context(model)
    batch = L.llama_batch_init(32, 0, 1)
    try:
        assert L.llama_n_ctx(ctx) == 64 and L.llama_n_batch(ctx) == 32 and L.llama_n_seq_max(ctx) == 1
        assert L.llama_get_model(ctx) == model
        # all outputs of the first 8 tokens, then only the last output of the next ones
        _fill(batch, ids[:8], 0, all_logits=True)
        assert L.llama_decode(ctx, batch) == 0
        np.testing.assert_array_equal(_logits(ctx, 8, n_vocab), want[:8])
        row3 = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, 3), shape=(n_vocab,))
        np.testing.assert_array_equal(row3, want[3])
        _fill(batch, ids[8:], 8, all_logits=False)
        assert L.llama_decode(ctx, batch) == 0
        np.testing.assert_array_equal(_logits(ctx, 1, n_vocab)[0], want[len(ids) - 1])
        last = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        np.testing.assert_array_equal(last, want[len(ids) - 1])
        # cut the sequence back to 5 tokens and go on from there: the logits of that sequence
        mem = L.llama_get_memory(ctx)
        assert L.llama_memory_seq_pos_max(mem, 0) == len(ids) - 1
        assert not L.llama_memory_seq_rm(mem, 0, 2, 4)  # a part the sequence continues after: cannot
        assert L.llama_memory_seq_rm(mem, -1, 5, -1)
        assert L.llama_memory_seq_pos_max(mem, 0) == 4 and L.llama_memory_seq_pos_min(mem, 0) == 0
        _fill(batch, ids[5:9], 5, all_logits=True)
        assert L.llama_decode(ctx, batch) == 0
        np.testing.assert_array_equal(_logits(ctx, 4, n_vocab), want[5:9])
        # llama_batch_get_one continues the sequence by itself
        one = (ctypes.c_int32 * 2)(*ids[9:11])
        assert L.llama_decode(ctx, L.llama_batch_get_one(one, 2)) == 0
        np.testing.assert_array_equal(_logits(ctx, 1, n_vocab)[0], want[10])
        L.llama_memory_clear(mem, True)
        assert L.llama_memory_seq_pos_max(mem, 0) == -1
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def test_llama_ctx_handle_shares_the_sequence(real_vocab_path: str, reference: Llama) -> None:
    """Decoding through Llama.ctx moves that Llama's own sequence, so the two APIs mix (guidance does this)."""
    ids = reference.tokenize(TEXT, add_bos=False)
    reference.reset()
    reference.eval(ids)
    want = reference.scores[: len(ids)].copy()
    with Llama(real_vocab_path, n_ctx=64, n_batch=32, verbose=False) as llm:
        assert isinstance(llm.model, int) and isinstance(llm.ctx, int) and llm.ctx == llm.ctx
        batch = L.llama_batch_init(llm.n_batch, 0, llm.n_ctx())  # guidance's n_seq_max: n_ctx
        _fill(batch, ids[:6], 0, all_logits=True)
        assert L.llama_decode(llm.ctx, batch) == 0
        assert llm.n_tokens == 6 and list(llm.input_ids[:6]) == ids[:6]
        llm.eval(ids[6:])  # the high-level API goes on from there
        np.testing.assert_array_equal(llm.sequence.last_logits, want[-1])
        L.llama_memory_seq_rm(L.llama_get_memory(llm.ctx), -1, 3, -1)
        assert llm.n_tokens == 3
        _fill(batch, ids[3:7], 3, all_logits=True)
        assert L.llama_decode(llm.ctx, batch) == 0
        np.testing.assert_array_equal(_logits(llm.ctx, 4, llm.n_vocab()), want[3:7])
        with pytest.raises(ValueError, match="belongs to a Llama"):
            L.llama_free(llm.ctx)
        ctx = llm.ctx
    with pytest.raises(ValueError, match="freed"):
        L.llama_n_ctx(ctx)
    voc = Llama(real_vocab_path, vocab_only=True, verbose=False)
    assert voc.ctx is None and L.llama_vocab_n_tokens(L.llama_model_get_vocab(voc.model)) == 129280
    handle = voc.model
    del voc
    gc.collect()
    with pytest.raises(ValueError, match="not a live"):  # a Llama's handles go with it (and do not keep it alive)
        L.llama_model_n_embd(handle)


@pytest.mark.filterwarnings("ignore:n_batch=8")
def test_decode_errors_name_the_limit(model: int) -> None:
    vocab = L.llama_model_get_vocab(model)
    ids = _tokens(vocab)
    ctx = _context(model, n_ctx=16, n_batch=8)
    batch = L.llama_batch_init(8, 0, 2)
    try:
        _fill(batch, ids[:4], 0, all_logits=False, seq=1)
        with pytest.raises(ValueError, match=r"one sequence \(seq_id 0"):
            L.llama_decode(ctx, batch)
        _fill(batch, ids[:4], 2, all_logits=False)
        with pytest.raises(ValueError, match=r"batch.pos\[0\] = 2, expected 0.*llama_memory_seq_rm"):
            L.llama_decode(ctx, batch)
        _fill(batch, ids[:4], 0, all_logits=False)
        batch.token[1] = 129280
        with pytest.raises(ValueError, match="129280"):
            L.llama_decode(ctx, batch)
        _fill(batch, ids[:4], 0, all_logits=False)
        batch.n_seq_id[2] = 3
        with pytest.raises(ValueError, match=r"n_seq_id\[2\] = 3"):
            L.llama_decode(ctx, batch)
        batch.n_tokens = 9
        with pytest.raises(ValueError, match="room"):
            L.llama_decode(ctx, batch)
        batch.n_tokens = 0
        with pytest.raises(ValueError, match="positive"):
            L.llama_decode(ctx, batch)
        with pytest.raises(ValueError, match="has not decoded"):
            L.llama_get_logits(ctx)
        # a full context: 1, as llama.cpp, and nothing evaluated
        many = ids * 2
        for start in (0, 8):
            _fill(batch, many[start : start + 8], start, all_logits=False)
            assert L.llama_decode(ctx, batch) == 0
        _fill(batch, ids[:1], 16, all_logits=False)
        assert L.llama_decode(ctx, batch) == 1
        assert L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0) == 15
        with pytest.raises(ValueError, match="no logits for index 3"):
            L.llama_get_logits_ith(ctx, 3)  # that token did not ask for logits
        with pytest.raises(ValueError, match="no logits for index -2"):
            L.llama_get_logits_ith(ctx, -2)
        mem = L.llama_get_memory(ctx)
        with pytest.raises(ValueError, match="one sequence"):
            L.llama_memory_seq_rm(mem, 1, 0, -1)
        with pytest.raises(ValueError, match="one sequence"):
            L.llama_memory_seq_cp(mem, 0, 1, 0, -1)
        with pytest.raises(ValueError, match="cannot shift"):
            L.llama_memory_seq_add(mem, 0, 0, -1, 4)
        assert not L.llama_memory_can_shift(mem)
        with pytest.raises(ValueError, match="n_batch"):
            big = L.llama_batch_init(9, 0, 1)
            _fill(big, ids[:9], 0, all_logits=False)
            L.llama_memory_clear(mem, True)
            L.llama_decode(ctx, big)
    finally:
        L.llama_batch_free(batch)
        L.llama_batch_free(batch)  # twice: nothing
        L.llama_free(ctx)


def test_bad_arguments_are_errors_not_crashes(model: int, tmp_path: Any) -> None:
    vocab = L.llama_model_get_vocab(model)
    buf = (ctypes.c_int32 * 4)()
    with pytest.raises(ValueError, match="holds 4 items, fewer than the length given"):
        L.llama_tokenize(vocab, TEXT, len(TEXT), buf, 100, False, False)
    with pytest.raises(ValueError, match="beyond its"):
        L.llama_tokenize(vocab, b"abc", 10, buf, 4, False, False)
    with pytest.raises(ValueError, match="n_tokens_max"):
        L.llama_tokenize(vocab, b"abc", 3, buf, -1, False, False)
    with pytest.raises(TypeError, match="4-byte"):
        L.llama_tokenize(vocab, b"abc", 3, (ctypes.c_int64 * 8)(), 8, False, False)
    with pytest.raises(TypeError, match="must be bytes"):
        L.llama_tokenize(vocab, "abc", 3, buf, 4, False, False)
    with pytest.raises(TypeError, match="writable"):
        L.llama_token_to_piece(vocab, 100, bytes(16), 16, 0, False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        L.llama_token_to_piece(vocab, 10**6, ctypes.create_string_buffer(16), 16, 0, False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        L.llama_vocab_get_text(vocab, -1)
    with pytest.raises(ValueError, match="not a live"):
        L.llama_vocab_n_tokens(12345)
    with pytest.raises(ValueError, match="NULL"):
        L.llama_vocab_n_tokens(None)
    with pytest.raises(TypeError, match="expected a llama_context_p, got a llama_vocab_p"):
        L.llama_n_ctx(vocab)
    with pytest.raises(ValueError, match="embd=4"):
        L.llama_batch_init(8, 4, 1)
    with pytest.raises(ValueError, match="would take"):
        L.llama_batch_init(2**31 - 1, 0, 2**31 - 1)
    # guidance asks for n_seq_max = n_ctx: room for 2^20 sequences per token is address space, not memory
    rss = _rss()
    big = L.llama_batch_init(512, 0, 1 << 20)
    for i in range(512):
        big.seq_id[i][0] = 0
    assert _rss() - rss < 64 << 20
    L.llama_batch_free(big)
    with pytest.raises(ValueError, match=r"n_seq_max must be between 1 and 256, got 257"):
        p = L.llama_context_default_params()
        p.n_seq_max = 257
        L.llama_init_from_model(model, p)
    ctx = _context(model)
    try:
        with pytest.raises(TypeError, match="expected a llama_model_p, got a llama_memory_t"):
            L.llama_model_free(L.llama_get_memory(ctx))
    finally:
        L.llama_free(ctx)
    with pytest.raises(ValueError, match="not a live llama_context_p"):
        L.llama_free(ctx)  # freed twice


def test_load_failures_return_null_and_log(tmp_path: Any) -> None:
    said: list[tuple[int, bytes]] = []
    cb = L.llama_log_callback(lambda level, text, user: said.append((level, text)))
    L.llama_log_set(cb, None)
    try:
        assert L.llama_model_load_from_file(str(tmp_path / "missing.gguf").encode(), None) is None
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 64)
        assert L.llama_load_model_from_file(str(bad).encode(), L.llama_model_default_params()) is None
    finally:
        L.llama_log_set(None, None)
    assert len(said) == 2 and all(level == L.GGML_LOG_LEVEL_ERROR for level, _ in said)
    assert b"missing.gguf" in said[0][1] and b"bad.gguf" in said[1][1]


def test_c_tokenize_callback(model: int) -> None:
    """llguidance calls `_lib.llama_tokenize` from Rust with raw addresses: the same tokens, and 0 (with the reason
    logged) where a Python caller would get an exception."""
    vocab = L.llama_model_get_vocab(model)
    fn_type = ctypes.CFUNCTYPE(
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.c_bool,
        ctypes.c_bool,
    )
    addr = ctypes.cast(L._lib.llama_tokenize, ctypes.c_void_p).value
    fn = fn_type(addr)
    out = (ctypes.c_int32 * 64)()
    n = fn(vocab, TEXT, len(TEXT), out, 64, False, False)
    assert list(out[:n]) == _tokens(vocab)
    assert fn(vocab, TEXT, len(TEXT), out, 1, False, False) == -n
    said: list[bytes] = []
    L.llama_log_set(L.llama_log_callback(lambda level, text, user: said.append(text)), None)
    try:
        assert fn(0xDEAD0, TEXT, len(TEXT), out, 64, False, False) == 0
    finally:
        L.llama_log_set(None, None)
    assert said and b"not a live" in said[0]
    with pytest.raises(AttributeError, match="no C library"):
        L._lib.llama_decode  # noqa: B018


def test_sampler_chain(model: int) -> None:
    vocab = L.llama_model_get_vocab(model)
    ids = _tokens(vocab)
    ctx = _context(model)
    try:
        assert L.llama_decode(ctx, L.llama_batch_get_one(ids, len(ids))) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(L.llama_n_vocab(vocab),)).copy()
        greedy = L.llama_sampler_init_greedy()
        assert L.llama_sampler_sample(greedy, ctx, -1) == int(np.argmax(logits))
        L.llama_sampler_free(greedy)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        for s in (
            L.llama_sampler_init_top_k(5),
            L.llama_sampler_init_top_p(0.9, 1),
            L.llama_sampler_init_min_p(0.01, 1),
            L.llama_sampler_init_temp(0.7),
            L.llama_sampler_init_dist(42),
        ):
            L.llama_sampler_chain_add(chain, s)
        assert L.llama_sampler_chain_n(chain) == 5 and L.llama_sampler_get_seed(chain) == 42
        top5 = set(np.argsort(-logits)[:5].tolist())
        drawn = [L.llama_sampler_sample(chain, ctx, -1) for _ in range(20)]
        assert set(drawn) <= top5
        L.llama_sampler_reset(chain)
        assert [L.llama_sampler_sample(chain, ctx, -1) for _ in range(20)] == drawn  # same seed, same draws
        with pytest.raises(ValueError, match="belongs to a chain"):
            L.llama_sampler_free(L.llama_sampler_chain_get(chain, 0))
        L.llama_sampler_free(chain)
        # a chain without a selecting stage
        chain = L.llama_sampler_chain_init(None)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(3))
        with pytest.raises(ValueError, match="selected no token"):
            L.llama_sampler_sample(chain, ctx, -1)
        # applied to a llama_token_data_array in place
        data = (L.llama_token_data * 6)(
            *[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate([1, 5, 3, 9, 0, 7])]
        )
        arr = L.llama_token_data_array(data, 6, -1, False)
        L.llama_sampler_apply(chain, ctypes.pointer(arr))
        assert arr.size == 3 and arr.sorted and [data[i].id for i in range(3)] == [3, 5, 1]
        L.llama_sampler_free(chain)
    finally:
        L.llama_free(ctx)


def test_internals_flow(real_vocab_path: str) -> None:
    """llama-cpp-python's own test_real_model flow (tests/test_llama.py) on our model: LlamaModel, LlamaContext,
    LlamaBatch, LlamaSampler, then closing the model closes its context."""
    params = L.llama_model_default_params()
    params.load_mode = L.LLAMA_LOAD_MODE_MMAP
    model = internals.LlamaModel(path_model=real_vocab_path, params=params)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
    cparams.logits_all = False  # not a field: upstream's test sets it anyway
    context = internals.LlamaContext(model=model, params=cparams)
    tokens = model.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True, special=True)
    assert model.detokenize(tokens) == b"The quick brown fox jumps over the lazy dog."
    assert model.n_vocab() == 129280 and model.token_eos() == L.llama_vocab_eos(model.vocab)
    assert model.metadata()["general.architecture"] == "deepseek4"
    batch = internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1)
    sampler = internals.LlamaSampler()
    sampler.add_top_k(50)
    sampler.add_top_p(0.9, 1)
    sampler.add_temp(0.8)
    sampler.add_dist(1337)
    result, n_eval = list(tokens), 0
    for _ in range(4):
        batch.set_batch(tokens, n_past=n_eval, logits_all=False)
        context.decode(batch)
        n_eval += len(tokens)
        tokens = [sampler.sample(context, -1)]
        result += tokens
    assert len(result) == n_eval + 1 and all(0 <= t < 129280 for t in result)
    with pytest.raises(ValueError, match="do not fit"):
        batch.set_batch(list(range(len(result) + 40)), n_past=0, logits_all=False)
    model.close()
    assert context.ctx is None and model.model is None
    sampler.close()
    batch.close()


def test_integer_kinds_and_context_extras(model: int) -> None:
    """ctypes and numpy integers where ints go (ctypes accepts them upstream), embeddings NULL as for a context
    without them, the engine's compute time in llama_perf_context."""
    vocab = L.llama_model_get_vocab(model)
    ids = np.zeros(64, np.int32)
    n = L.llama_tokenize(vocab, TEXT, ctypes.c_int(len(TEXT)), ids, np.int64(64), False, False)
    assert list(ids[:n]) == _tokens(vocab)
    with pytest.raises(TypeError, match="n_tokens_max must be an integer"):
        L.llama_tokenize(vocab, TEXT, len(TEXT), ids, 64.0, False, False)
    ctx = _context(model)
    try:
        assert L.llama_decode(ctx, L.llama_batch_get_one(ids[:n].tolist(), np.int32(n))) == 0
        assert L.llama_get_embeddings(ctx) is None
        with pytest.raises(ValueError, match=r"Llama\.embed"):
            L.llama_set_embeddings(ctx, True)
        assert L.llama_perf_context(ctx).t_eval_ms > 0
        L.llama_perf_context_reset(ctx)
        assert L.llama_perf_context(ctx).t_eval_ms == 0
        L.llama_synchronize(ctx)
        mem = L.llama_get_memory(ctx)
        assert L.llama_memory_seq_rm(mem, np.int32(0), ctypes.c_int(2), -1)
        assert L.llama_memory_seq_pos_max(mem, 0) == 1
        with pytest.raises(ValueError, match="decoder-only"):
            L.llama_encode(ctx, L.llama_batch_get_one(ids[:1].tolist(), 1))
    finally:
        L.llama_free(ctx)
