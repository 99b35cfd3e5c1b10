"""Bad parameters and states (issue 9): sampling values llama-cpp-python gives a meaning to work the same here and
only truly invalid ones raise; n_ctx <= 0 or beyond memory, prompts longer than the context, invalid token ids,
calls after close() and concurrent calls from several threads all end in a clear exception or in the same
results as sequential calls, never in a crash or a corrupted state."""

from __future__ import annotations

import gc
import math
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from llama_dsv4 import Llama, LlamaState
from llama_dsv4.engine import runtime
from llama_dsv4.engine.memory import state_bytes

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def llm(micro_path: str) -> Iterator[Llama]:
    with Llama(micro_path, n_ctx=128, n_batch=64, n_threads=1, n_threads_batch=1, verbose=False) as m:
        yield m


def text(llm: Llama, **kw: object) -> str:
    return llm(PROMPT, max_tokens=6, **kw)["choices"][0]["text"]  # type: ignore[arg-type,index]


# ---------------------------------------------------------------------------------------------- sampling values


def test_sampling_values_llama_cpp_python_accepts(llm: Llama) -> None:
    greedy = text(llm, temperature=0.0)
    # as llama.cpp's samplers: top_k <= 0 and top_p >= 1 disable the step; min_p > 1 keeps only the top token
    # (min_keep = 1); negative temperature draws from the full distribution; penalties may be negative
    for kw in (
        dict(top_k=0),
        dict(top_k=-1),
        dict(top_k=10**9),
        dict(top_p=1.5),
        dict(top_p=0.0),
        dict(top_p=-1.0),
        dict(min_p=-1.0),
        dict(min_p=0.0),
        dict(typical_p=-1.0),
        dict(typical_p=2.0),
        dict(temperature=-1.0),
        dict(temperature=-0.5, top_k=-3),
        dict(frequency_penalty=-5.0),
        dict(presence_penalty=1e30),
        dict(repeat_penalty=1e-3),
        dict(mirostat_mode=2, mirostat_tau=-1.0),
        dict(mirostat_mode=1, mirostat_eta=0.0),
        dict(seed=-1),
        dict(seed=2**70),
        dict(logit_bias={5: -math.inf}),
        dict(logit_bias={5: math.inf}),
        dict(temperature=np.float32(0.7), top_p=np.float64(0.9), top_k=np.int64(5)),
    ):
        assert isinstance(text(llm, **kw), str), kw
    # the disabling values mean exactly "disabled", and min_p > 1 means greedy
    assert text(llm, min_p=2.0, temperature=1.0, top_k=0, top_p=1.0, seed=3) == greedy
    assert text(llm, top_k=-1, seed=7) == text(llm, top_k=0, seed=7)
    assert text(llm, top_p=1.5, seed=7) == text(llm, top_p=1.0, seed=7)
    assert text(llm, temperature=-1.0, seed=11) == text(llm, temperature=-1.0, seed=11)  # seeded plain draw
    assert text(llm, logit_bias={5: math.inf}, temperature=0.0).startswith(llm.detokenize([5]).decode(errors="ignore"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(temperature=math.nan), "temp must be a finite number"),
        (dict(temperature=math.inf), "temp must be a finite number"),
        (dict(temperature="0.5"), "temp must be a finite number"),
        (dict(top_p=math.nan), "top_p must be a finite number"),
        (dict(min_p=-math.inf), "min_p must be a finite number"),
        (dict(typical_p=math.nan), "typical_p must be a finite number"),
        (dict(frequency_penalty=math.inf), "frequency_penalty must be a finite number"),
        (dict(presence_penalty=math.nan), "presence_penalty must be a finite number"),
        (dict(repeat_penalty=0.0), "repeat_penalty must be positive"),
        (dict(repeat_penalty=-1.0), "repeat_penalty must be positive"),
        (dict(mirostat_mode=3), "mirostat_mode must be 0, 1 or 2"),
        (dict(mirostat_mode=2, mirostat_tau=math.nan), "mirostat_tau must be a finite number"),
        (dict(logit_bias={5: math.nan}), "logit_bias for token 5 must be a number"),
        (dict(logit_bias={10**9: 1.0}), "logit_bias token id 1000000000 is outside the vocabulary"),
        (dict(logprobs=-1), "logprobs must be a non-negative integer"),
    ],
)
def test_invalid_sampling_values_raise_value_error(llm: Llama, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        text(llm, **kw)


def test_wrong_types_raise_type_error(llm: Llama) -> None:
    with pytest.raises(TypeError, match="top_k must be an integer"):
        text(llm, top_k=2.5)
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        text(llm, stop=5)
    with pytest.raises(TypeError, match="max_tokens must be an integer"):
        llm(PROMPT, max_tokens=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt must be a string or a list of token ids"):
        llm(12)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- sizes


def test_n_ctx_values(micro_path: str) -> None:
    with Llama(micro_path, n_ctx=0, n_threads=1, verbose=False) as m:
        assert m.n_ctx() == 4096  # 0: the model's training context
    with pytest.raises(ValueError, match="n_ctx must be >= 0"):
        Llama(micro_path, n_ctx=-1, verbose=False)
    with pytest.raises(TypeError, match="n_ctx must be an integer"):
        Llama(micro_path, n_ctx=64.0, verbose=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n_ctx=2147483648 is beyond this engine's limit"):
        Llama(micro_path, n_ctx=2**31, verbose=False)
    for kw in (dict(n_batch=0), dict(n_ubatch=-1), dict(n_threads=-2), dict(n_threads_batch=-2)):
        with pytest.raises(ValueError, match="must be"):
            Llama(micro_path, n_ctx=64, verbose=False, **kw)  # type: ignore[arg-type]


def test_n_ctx_beyond_memory_is_refused_before_allocating(micro_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2^30 positions of this model's state is 130 GiB: refused up front, not attempted
    from llama_dsv4.model.loader import load_model

    with load_model(micro_path) as m:
        params = m.params
    avail = runtime.available_host_memory()
    assert avail is not None and avail > 0
    assert state_bytes(params, 1 << 30, 512) > avail
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"n_ctx=1073741824 needs [\d.]+ GiB of memory .* GiB is available"):
        Llama(micro_path, n_ctx=1 << 30, verbose=False)
    assert time.perf_counter() - t0 < 10
    # a tight machine (or container): the same check with a small budget
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match="n_ctx=4096 needs"):
        Llama(micro_path, n_ctx=4096, verbose=False)
    # logits_all keeps n_ctx x n_vocab floats on the host: counted as well
    plain = state_bytes(params, 2048, 512) + 4 * 2048 + 4 * 512 * 512  # state, input_ids, n_batch rows of scores
    every = state_bytes(params, 2048, 512) + 4 * 2048 + 4 * 2048 * 512  # ... n_ctx rows of scores
    monkeypatch.setattr(runtime, "available_host_memory", lambda: int((plain + every) / 2 / 0.95))
    with Llama(micro_path, n_ctx=2048, n_threads=1, verbose=False):
        pass
    with pytest.raises(ValueError, match="n_ctx=2048 needs"):
        Llama(micro_path, n_ctx=2048, logits_all=True, verbose=False)


def test_weights_read_into_memory_are_counted(micro_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_mmap=False puts every weight in memory the process allocates: the memory check counts it (mapped weights
    are page cache, which the kernel reclaims, and are not)."""
    from llama_dsv4.model.loader import load_model

    with load_model(micro_path) as m:
        params, weights = m.params, m.n_bytes
    need = state_bytes(params, 64, 64) + 4 * 64 + 4 * 64 * 512  # state, input_ids, n_batch rows of scores
    monkeypatch.setattr(runtime, "available_host_memory", lambda: int((need + weights // 2) / 0.95))
    with Llama(micro_path, n_ctx=64, n_batch=64, n_threads=1, verbose=False):
        pass
    with pytest.raises(ValueError, match=r"n_ctx=64 needs .* the weights read into memory .*or use_mmap=True"):
        Llama(micro_path, n_ctx=64, n_batch=64, use_mmap=False, verbose=False)
    monkeypatch.setattr(runtime, "available_host_memory", lambda: int((need + weights) / 0.95) + 1)
    with Llama(micro_path, n_ctx=64, n_batch=64, n_threads=1, use_mmap=False, verbose=False):
        pass


def test_prompts_longer_than_the_context(micro_path: str) -> None:
    with Llama(micro_path, n_ctx=32, n_threads=1, verbose=False) as m:
        for call in (
            lambda: m(list(range(1, 41)), max_tokens=1),
            lambda: m("word " * 40, max_tokens=1),
            lambda: m.create_chat_completion([{"role": "user", "content": "word " * 40}], max_tokens=1),
            lambda: m.eval(list(range(1, 41))),
            lambda: next(m.generate(list(range(1, 41)))),
            lambda: m(list(range(1, 33)), max_tokens=1),  # exactly n_ctx: no room for a new token
        ):
            with pytest.raises(ValueError, match=r"Requested tokens \(\d+\) exceed context window of 32"):
                call()
        m.eval(list(range(1, 31)))  # 30 of 32: then 3 more do not fit
        with pytest.raises(ValueError, match=r"Requested tokens \(33\) exceed context window of 32"):
            m.eval([1, 2, 3])
        assert m.n_tokens == 30


def test_prompts_far_over_the_context_are_refused_before_tokenizing(real_vocab_path: str, monkeypatch: Any) -> None:
    """A 4 MB prompt cannot fit 64 positions, and its length shows it (no token covers more than 128 bytes): text
    completions, fill-in-the-middle and chat completions refuse it with the context error at once, encoding none
    of it (tokenizing it all took seconds and GBs)."""
    from test_tokenizer import EncodeSpy

    big = "word " * 800_000
    with Llama(real_vocab_path, n_ctx=64, n_threads=1, verbose=False) as m:
        tok = m.dsv4_tokenizer
        spies = EncodeSpy(tok._special), EncodeSpy(tok._plain_tokenizer())
        monkeypatch.setattr(tok, "_special", spies[0])
        monkeypatch.setattr(tok, "_plain", spies[1])
        for call in (
            lambda: m(big, max_tokens=1),
            lambda: m(big, suffix="x", max_tokens=1),
            lambda: m("x", suffix=big, max_tokens=1),
            lambda: m.create_chat_completion([{"role": "user", "content": big}], max_tokens=1),
        ):
            t0 = time.perf_counter()
            # (a chat prompt stops rendering first: it is longer than 64 positions x 128 bytes could hold)
            with pytest.raises(ValueError, match=r"least \d{5}\) exceed context window of 64|context of 64 tokens can"):
                call()
            assert time.perf_counter() - t0 < 3
        assert spies[0].chars == 0 and spies[1].chars < 10  # (the FIM prefix "x")
        fits = "word " * 10  # and prompts that fit still run
        assert m(fits, max_tokens=1)["usage"]["prompt_tokens"] == len(m.tokenize(fits.encode(), special=True)) > 10


# ---------------------------------------------------------------------------------------------- token ids


def test_invalid_token_ids(llm: Llama) -> None:
    n = llm.n_vocab()
    for bad in ([-1], [n], [2**70], [1, 2, n + 5]):
        for call in (llm.detokenize, llm.eval, lambda t: llm(t, max_tokens=1), llm.tokenizer().decode):
            with pytest.raises(ValueError, match=r"token id -?\d+ is outside the vocabulary \[0, 512\)"):
                call(bad)
    for bad in ([1.5], ["5"], [None], [b"x"]):
        for call in (llm.detokenize, llm.eval, lambda t: llm(t, max_tokens=1)):
            with pytest.raises(TypeError, match="token ids must be integers"):
                call(bad)
    assert llm.detokenize(np.array([65, 66], np.int32)) == llm.detokenize([65, 66])  # numpy ids are integers
    with pytest.raises(ValueError, match="sample needs evaluated tokens"):
        llm.reset()
        llm.sample()


# ---------------------------------------------------------------------------------------------- closed


def test_every_call_after_close_is_a_clear_error(micro_path: str) -> None:
    m = Llama(micro_path, n_ctx=64, n_threads=1, verbose=False)
    m.eval([1, 2, 3])
    state = m.save_state()
    stream = m(PROMPT, max_tokens=20, stream=True)
    next(stream)
    m.close()
    m.close()  # twice is fine
    calls = {
        "a stream opened before close": lambda: list(stream),  # first: until it ends, it holds the Llama
        "tokenize": lambda: m.tokenize(b"hi"),
        "detokenize": lambda: m.detokenize([1]),
        "eval": lambda: m.eval([1]),
        "sample": lambda: m.sample(),
        "generate": lambda: next(m.generate([1, 2])),
        "__call__": lambda: m("hi", max_tokens=1),
        "create_completion stream": lambda: next(m.create_completion("hi", max_tokens=1, stream=True)),
        "create_chat_completion": lambda: m.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=1),
        "save_state": lambda: m.save_state(),
        "load_state": lambda: m.load_state(state),
        "tokenizer().encode": lambda: m.tokenizer().encode("x"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="closed"):
            call()
        assert name


def test_foreign_or_corrupt_states_are_refused(micro_path: str) -> None:
    with (
        Llama(micro_path, n_ctx=64, n_threads=1, verbose=False) as a,
        Llama(micro_path, n_ctx=128, n_threads=1, verbose=False) as b,
    ):
        a.eval(PROMPT)
        good = a.save_state()
        with pytest.raises(ValueError, match="not a state of this context"):
            b.load_state(good)  # another n_ctx
        for broken in (
            LlamaState(good.input_ids, good.scores, good.n_tokens, good.llama_state[:-7], 0, 0),
            LlamaState(good.input_ids, good.scores, good.n_tokens, b"junk" * 100, 0, 0),
            LlamaState(good.input_ids, good.scores, 10**6, good.llama_state, 0, 0),
            LlamaState(good.input_ids, good.scores, good.n_tokens - 1, good.llama_state, 0, 0),
        ):
            with pytest.raises(ValueError, match="not a state of this"):
                a.load_state(broken)
        a.load_state(good)  # the good one still works after the refusals
        assert a.n_tokens == len(PROMPT)


# ---------------------------------------------------------------------------------------------- threads


def test_concurrent_completions_equal_sequential_ones(micro_path: str) -> None:
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(6)]
    with Llama(micro_path, n_ctx=128, n_threads=1, n_threads_batch=1, verbose=False) as m:
        seq = [m(p, max_tokens=8, temperature=0.0)["choices"][0]["text"] for p in prompts]
        streamed = [
            "".join(c["choices"][0]["text"] for c in m(p, max_tokens=8, temperature=0.0, stream=True)) for p in prompts
        ]
        assert streamed == seq
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                got = list(pool.map(lambda p: m(p, max_tokens=8, temperature=0.0)["choices"][0]["text"], prompts))
                assert got == seq
                got = list(
                    pool.map(
                        lambda p: "".join(
                            c["choices"][0]["text"] for c in m(p, max_tokens=8, temperature=0.0, stream=True)
                        ),
                        prompts,
                    )
                )
                assert got == seq

        def gen(p: list[int]) -> list[int]:
            out = []
            for t in m.generate(p, temp=0.0):
                out.append(t)
                if len(out) == 6:
                    break
            return out

        seq_gen = [gen(p) for p in prompts]
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(gen, prompts)) == seq_gen


def test_concurrent_evals_never_corrupt_the_sequence(micro_path: str) -> None:
    with Llama(micro_path, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False, logits_all=True) as m:
        batches = [[k + 1] * (5 + k) for k in range(8)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(m.eval, batches))
        n = sum(len(b) for b in batches)
        assert m.n_tokens == n
        ids = m.input_ids[:n].tolist()
        # every batch landed whole, in some order
        pos, seen = 0, []
        while pos < n:
            b = next(b for b in batches if ids[pos : pos + len(b)] == b and b not in seen)
            seen.append(b)
            pos += len(b)
        # and the logits are those of evaluating the same batches in that order, alone
        with Llama(micro_path, n_ctx=512, n_threads=1, verbose=False, logits_all=True) as fresh:
            for b in seen:
                fresh.eval(b)
            np.testing.assert_array_equal(m.scores[:n], fresh.scores[:n])


def test_a_stream_may_move_between_threads(micro_path: str) -> None:
    """Web frameworks iterate a sync stream from a thread pool: each chunk may come from another thread."""
    with Llama(micro_path, n_ctx=128, n_threads=1, verbose=False) as m:
        whole = m(PROMPT, max_tokens=10, temperature=0.0)["choices"][0]["text"]
        stream = m(PROMPT, max_tokens=10, temperature=0.0, stream=True)
        parts = []
        with ThreadPoolExecutor(3) as pool:
            while True:
                chunk = pool.submit(next, stream, None).result(timeout=60)
                if chunk is None:
                    break
                parts.append(chunk["choices"][0]["text"])
        assert "".join(parts) == whole
        # another thread's completion waits for the stream instead of corrupting it
        stream = m(PROMPT, max_tokens=10, temperature=0.0, stream=True)
        first = next(stream)["choices"][0]["text"]
        other = ThreadPoolExecutor(1).submit(lambda: m([1, 2], max_tokens=3, temperature=0.0))
        time.sleep(0.2)
        assert not other.done()
        rest = "".join(c["choices"][0]["text"] for c in stream)
        assert first + rest == whole
        assert (
            other.result(timeout=60)["choices"][0]["text"]
            == m([1, 2], max_tokens=3, temperature=0.0)["choices"][0]["text"]
        )
        # two streams interleaved in one thread: a clear error, not a mix
        s1 = m(PROMPT, max_tokens=5, stream=True)
        next(s1)
        with pytest.raises(RuntimeError, match="still running in this thread"):
            next(m([1, 2], max_tokens=5, stream=True))
        s1.close()


def test_close_while_another_thread_computes(micro_path: str) -> None:
    for delay in (0.0, 0.05, 0.2):
        m = Llama(micro_path, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
        outcome: list[str] = []

        def work(m: Llama = m, outcome: list[str] = outcome) -> None:
            try:
                for _ in range(20):
                    m(list(range(1, 200)), max_tokens=50, temperature=0.0)
                outcome.append("finished")
            except ValueError as e:
                outcome.append(str(e))

        t = threading.Thread(target=work)
        t.start()
        time.sleep(delay)
        m.close()
        t.join(120)
        assert not t.is_alive()
        assert outcome and (outcome[0] == "finished" or "closed" in outcome[0]), outcome


# ---------------------------------------------------------------------------------------------- states and streams


def test_save_state_while_another_thread_evaluates_is_a_snapshot(micro_path: str) -> None:
    """Every state saved while another thread evaluates holds one moment: its tokens, its logits and its engine
    state agree (n_tokens used to be read after the lock was released)."""
    tokens = [int(x) for x in np.random.default_rng(3).integers(3, 250, 200)]
    with Llama(micro_path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False) as m:
        logits: dict[int, np.ndarray] = {}
        done = threading.Event()

        states: list[Any] = []

        def run() -> None:
            try:
                for i, t in enumerate(tokens):
                    m.eval([t])
                    logits[m.n_tokens] = m.sequence.last_logits.copy()  # type: ignore[union-attr]  # the only writer
                    if (i + 1) % 25 == 0:  # wait for a save of this moment: the states span the run whatever the
                        deadline = time.monotonic() + 10  # scheduler does (a loaded machine once gave 4 moments)
                        while not any(s.n_tokens == i + 1 for s in states[-3:]) and time.monotonic() < deadline:
                            time.sleep(0.0005)
            finally:
                done.set()

        worker = threading.Thread(target=run)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: any window between reads shows
        try:
            worker.start()
            while not done.is_set():
                states.append(m.save_state())
            worker.join()
        finally:
            sys.setswitchinterval(interval)
        assert len(states) >= 20 and len({s.n_tokens for s in states}) >= 8, len(states)
        for s in states:
            n = s.n_tokens
            assert s.input_ids[:n].tolist() == tokens[:n]
            if n:
                np.testing.assert_array_equal(s.scores[-1], logits[n])
        for s in states[:: max(len(states) // 100, 1)]:  # and each one loads as what it says it is
            m.load_state(s)
            assert m.n_tokens == s.n_tokens == m._ctx.n_past
            if s.n_tokens < len(tokens):
                m.eval([tokens[s.n_tokens]])
                np.testing.assert_array_equal(m.sequence.last_logits, logits[s.n_tokens + 1])


def test_a_refused_state_leaves_the_context_as_it_was(micro_path: str) -> None:
    with Llama(micro_path, n_ctx=64, n_threads=1, verbose=False) as a:
        a.eval(PROMPT)
        good = a.save_state()
        a.eval([3])
        want = a.sequence.last_logits.copy()  # type: ignore[union-attr]
        n = len(PROMPT)
        for broken, match in (
            (LlamaState(good.input_ids, good.scores, n - 1, good.llama_state, 0, 0), f"says {n - 1} tokens.*holds {n}"),
            (LlamaState(good.input_ids, good.scores, n, good.llama_state[:-7], 0, 0), r"bytes, a state of this"),
            (LlamaState(good.input_ids[:3], good.scores, n, good.llama_state, 0, 0), "3 token ids"),
            (LlamaState(good.input_ids * 0 + 10**6, good.scores, n, good.llama_state, 0, 0), "outside the vocab"),
            (LlamaState(good.input_ids, good.scores[:, :5], n, good.llama_state, 0, 0), "logits"),
            (LlamaState(good.input_ids, good.scores[:0], n, good.llama_state, 0, 0), "logits"),
            (LlamaState(good.input_ids, good.scores, n, "text", 0, 0), "bytes"),
            (LlamaState(good.input_ids, good.scores, "8", good.llama_state, 0, 0), "n_tokens"),
            (LlamaState(good.input_ids, good.scores, n, good.llama_state, 0, "seed"), "seed"),
        ):
            with pytest.raises(ValueError, match=match):
                a.load_state(broken)
            assert a.n_tokens == n + 1 and a._ctx.n_past == n + 1  # untouched
        with pytest.raises(ValueError, match="not a LlamaState"):
            a.load_state(object())  # type: ignore[arg-type]
        a.eval([4])
        a.load_state(good)
        a.eval([3])
        np.testing.assert_array_equal(a.sequence.last_logits, want)
    with (
        Llama(micro_path, n_ctx=64, n_threads=1, verbose=False) as b,
        Llama(micro_path, n_ctx=64, n_threads=1, verbose=False, logits_all=True) as c,
    ):
        c.eval(PROMPT)
        c.load_state(c.save_state())
        b.load_state(c.save_state())  # all the logits: the last one is what a plain Llama keeps
        np.testing.assert_array_equal(b.sequence.last_logits, c.scores[n - 1])
        b.eval(PROMPT[:2])
        with pytest.raises(ValueError, match=f"logits for 1 of {n + 2} positions"):
            c.load_state(b.save_state())  # one row cannot stand for every position
        assert c.n_tokens == n


def test_changing_the_sequence_under_an_open_stream_is_refused(micro_path: str) -> None:
    with Llama(micro_path, n_ctx=128, n_threads=1, verbose=False) as m:
        whole = m(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
        m.eval([1, 2, 3])
        other = m.save_state()
        for name in ("completion", "generate"):
            if name == "completion":
                stream = m(PROMPT, max_tokens=8, temperature=0.0, stream=True)
                first = next(stream)["choices"][0]["text"]
            else:
                stream = m.generate(PROMPT, temp=0.0)
                next(stream)
            for call in (m.reset, lambda: m.load_state(other), lambda: m.eval([5])):
                with pytest.raises(RuntimeError, match=r"stream .* is open in this thread"):
                    call()
            snapshot = m.save_state()  # reading is fine
            if name == "completion":
                assert first + "".join(c["choices"][0]["text"] for c in stream) == whole  # went on unchanged
            else:
                stream.close()
            m.load_state(snapshot)  # once the stream is over, everything is allowed again
            m.reset()


def test_close_frees_the_buffers_at_once(micro_path: str) -> None:
    gc.collect()
    gc.disable()
    try:
        m = Llama(micro_path, n_ctx=256, n_threads=1, verbose=False, logits_all=True)
        m.eval(PROMPT)
        scores, ids = weakref.ref(m.scores), weakref.ref(m.input_ids)
        m.close()
        assert scores() is None and ids() is None  # no collection needed
        m = Llama(micro_path, n_ctx=256, n_threads=1, verbose=False, logits_all=True)
        m.eval(PROMPT)
        whole, scores = weakref.ref(m), weakref.ref(m.scores)
        del m  # no reference cycle: the Llama and its buffers go when the last reference does
        assert whole() is None and scores() is None
    finally:
        gc.enable()
