"""Continuous batching (docs/batching.md, the last section): completions running at once on the sequences of one
context meet in the runner's batcher and are evaluated together, each getting the tokens it gets alone; slots,
create_completions, kv_unified, cancellation, errors and closing."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from llama_dsv4 import Llama
from llama_dsv4.model.writer import write_model

N_CTX = 400
# prompt lengths whose greedy continuations cross 4-blocks and the 128-block at different steps
LENGTHS = (2, 61, 125, 127)
N_GEN = 8
GREEDY: dict[str, Any] = dict(max_tokens=N_GEN, temperature=0, top_k=1)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model in f32: a mixed ubatch gives each sequence the logits it gets alone, bit for bit."""
    return write_model(os.path.join(tmp_path_factory.mktemp("batching"), "tiny-f32.gguf"), dtype="f32")[0]


def make(path: str, **kw: Any) -> Llama:
    kw = {"n_ctx": N_CTX, "n_batch": 64, "n_ubatch": 64, "n_threads": 1, "n_threads_batch": 1, **kw}
    return Llama(path, verbose=False, **kw)


def prompts(n: int = len(LENGTHS), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 200, LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS)).tolist() for i in range(n)]


def text(response: Any) -> str:
    return str(response["choices"][0]["text"])


@pytest.fixture(scope="module")
def alone(path: str) -> list[str]:
    """Each prompt's greedy continuation on a context of one sequence."""
    with make(path) as llm:
        return [text(llm.create_completion(p, **GREEDY)) for p in prompts(8)]


class Steps:
    """Wraps the runner's eval_batch: every step's (seq_id, n_tokens) pairs."""

    def __init__(self, llm: Llama) -> None:
        self.runner = llm._runner
        self.inner = self.runner.eval_batch
        self.steps: list[list[tuple[int, int]]] = []
        self.fail: Any = None  # a function of the step that may raise
        self.runner.eval_batch = self  # type: ignore[method-assign]

    def __call__(self, seqs: list[tuple[int, list[int]]], all_logits: bool, n_threads: int) -> Any:
        step = [(s, len(t)) for s, t in seqs]
        if self.fail is not None:
            self.fail(step)
        self.steps.append(step)
        return self.inner(seqs, all_logits, n_threads)

    @property
    def widest(self) -> int:
        return max(len(s) for s in self.steps)


def run_threads(fns: list[Any], timeout: float = 60) -> list[Any]:
    """Run each function in its own thread; their results (or exceptions), in order; fails on a hang."""
    out: list[Any] = [None] * len(fns)

    def one(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as e:  # handed to the test
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a caller hangs"
    return out


def test_concurrent_slots_give_each_prompts_tokens_and_are_batched(path: str, alone: list[str]) -> None:
    """Four completions at once on four slots: each its own greedy text, identical to alone; the steps mix the
    sequences (fewer engine calls than alone, steps of several sequences, never more than n_ubatch tokens)."""
    with make(path, n_seq_max=4) as llm:
        steps = Steps(llm)
        slots = [llm.slot(i) for i in range(4)]
        got = run_threads(
            [lambda s=s, p=p: text(s.create_completion(p, **GREEDY)) for s, p in zip(slots, prompts(), strict=True)]
        )
        assert got == alone[:4]
        assert steps.widest >= 2
        assert all(sum(n for _, n in step) <= 64 and len({s for s, _ in step}) == len(step) for step in steps.steps)
        # alone: one call per decode token and per 64-token prompt batch (plus the chunks of 125/127 over 64)
        alone_calls = sum(-(-n // 64) + N_GEN - 1 for n in LENGTHS)
        assert len(steps.steps) < alone_calls


def test_create_completions_in_order_and_equal_to_sequential(path: str, alone: list[str]) -> None:
    """Eight prompts on three sequences (the others wait for a free one): the responses in prompt order, the same
    texts as one after another; with n_seq_max = 1 the plain sequential path."""
    with make(path, n_seq_max=3) as llm:
        steps = Steps(llm)
        got = [text(r) for r in llm.create_completions(prompts(8), **GREEDY)]
        assert got == alone
        assert steps.widest >= 2
        assert {s for step in steps.steps for s, _ in step} == {0, 1, 2}
        with pytest.raises(ValueError, match="stream=True is not supported"):
            llm.create_completions(prompts(2), stream=True)
    with make(path) as one:
        assert one._runner.batcher is None  # n_seq_max = 1: Runner.eval is the engine's own, under the lock
        assert [text(r) for r in one.create_completions(prompts(3), **GREEDY)] == alone[:3]
        assert one.slot(0) is one
        with pytest.raises(ValueError, match="not a sequence of this Llama"):
            one.slot(1)


def test_one_sequence_context_gives_the_same_numbers(path: str) -> None:
    """n_seq_max = 1 (the default) and a slot of a context of two give the logits of the single-sequence path."""
    toks = prompts(1)[0] + [7, 8, 9]
    with make(path, logits_all=True) as a:
        a.eval(toks)
        ref = a.scores[: len(toks)].copy()
    with make(path, logits_all=True, n_seq_max=2) as b:
        b.slot(1).eval(toks)
        np.testing.assert_array_equal(b.slot(1).scores[: len(toks)], ref)


def test_a_stream_joining_mid_stream_and_one_cancelled(path: str, alone: list[str]) -> None:
    """Slot 0 streams; slot 1 joins after a few tokens and its stream is closed after three chunks (the client
    left): slot 0 still completes with its own tokens, slot 1's sequence is no longer active, and slot 1 serves
    the next completion correctly."""
    with make(path, n_seq_max=2) as llm:
        steps = Steps(llm)
        a, b = llm.slot(0), llm.slot(1)
        p = prompts()
        stream_a = a.create_completion(p[1], stream=True, **GREEDY)
        first = [next(stream_a)["choices"][0]["text"] for _ in range(2)]  # type: ignore[call-overload]
        joined, a_done = threading.Event(), threading.Event()

        def other() -> str:
            stream_b = b.create_completion(p[2], stream=True, **{**GREEDY, "max_tokens": 200})
            out = []
            for chunk in stream_b:  # type: ignore[union-attr]
                out.append(chunk["choices"][0]["text"])
                joined.set()
                if a_done.is_set() and len(out) >= 3:
                    break
            stream_b.close()  # type: ignore[union-attr]  (the client left)
            return "".join(out)

        def rest() -> str:
            joined.wait(30)
            try:
                return "".join(c["choices"][0]["text"] for c in stream_a)  # type: ignore[union-attr]
            finally:
                a_done.set()

        b_text, a_rest = run_threads([other, rest])
        assert "".join(first) + a_rest == alone[1]
        assert alone[2].startswith(b_text) or b_text.startswith(alone[2])  # (b went on beyond N_GEN tokens)
        assert any({s for s, _ in step} == {0, 1} for step in steps.steps)  # they met
        assert llm._runner.batcher._active == set()  # type: ignore[union-attr]
        assert text(b.create_completion(p[3], **GREEDY)) == alone[3]


def test_an_error_reaches_only_its_caller(path: str, alone: list[str]) -> None:
    """A call the engine refuses (a token id outside the vocabulary, sent under the sequence layer's checks) fails
    alone while a completion on another slot goes on; a mix whose graph cannot be had (MemoryError) is computed in
    smaller steps; an unexpected error fails the callers of its step, not the others, and nobody hangs."""
    with make(path, n_seq_max=3) as llm:
        steps = Steps(llm)
        runner = llm._runner
        p = prompts()

        def bad() -> Any:
            time.sleep(0.05)
            return runner.eval(1, [10**6], False, 1)

        done, err = run_threads([lambda: text(llm.create_completion(p[0], **GREEDY)), bad])
        assert done == alone[0]
        assert isinstance(err, ValueError) and "outside the vocabulary" in str(err)

        def no_mixes(step: list[tuple[int, int]]) -> None:
            if len(step) > 1:
                raise MemoryError("a mix of several sequences")

        steps.fail, steps.steps = no_mixes, []
        got = run_threads([lambda s=s: text(llm.slot(s).create_completion(p[s], **GREEDY)) for s in range(3)])
        assert got == alone[:3]
        assert runner.batcher.max_seqs == 1 and steps.widest == 1  # type: ignore[union-attr]

        def broken(step: list[tuple[int, int]]) -> None:
            if any(s == 2 for s, _ in step):
                raise RuntimeError("compute failed")

        runner.batcher.max_seqs = 64  # type: ignore[union-attr]
        steps.fail = broken
        out = run_threads([lambda s=s: text(llm.slot(s).create_completion(p[s], **GREEDY)) for s in range(3)])
        assert isinstance(out[2], RuntimeError)
        assert all(o == alone[i] or isinstance(o, RuntimeError) for i, o in enumerate(out))  # (a mix with 2)
        steps.fail = None
        assert text(llm.slot(2).create_completion(p[2], **GREEDY)) == alone[2]  # the sequence recovers


def test_closing_fails_the_waiting_callers_and_slots_release_their_sequence(path: str) -> None:
    """Callers waiting in the batcher (for an active sequence that sends nothing) get "closed" when the Llama is
    closed; a slot's close() releases only its sequence, the owner's closes every slot."""
    llm = make(path, n_seq_max=3, batch_wait_ms=60_000)
    runner = llm._runner
    runner.set_active(0, True)  # a completion "runs" on sequence 0 and never evaluates: steps wait for it
    started = threading.Barrier(3)

    def waiter(s: int) -> Any:
        started.wait()
        return llm.slot(s).eval([1, 2, 3])

    def closer() -> None:
        started.wait()
        time.sleep(0.2)
        llm.close()

    t0 = time.monotonic()
    out = run_threads([lambda: waiter(1), lambda: waiter(2), closer])
    assert time.monotonic() - t0 < 30
    assert all(isinstance(o, ValueError) and "closed" in str(o) for o in out[:2]), out
    with pytest.raises(ValueError, match="closed"):
        llm.slot(1)

    with make(path, n_seq_max=3) as llm:
        one = llm.slot(1)
        assert llm.slot(1) is one and one.slot(2) is llm.slot(2)
        one.eval([5, 6, 7])
        llm.eval([5, 6])
        one.close()
        with pytest.raises(ValueError, match="closed"):
            one.eval([1])
        assert llm._runner.n_past(1) == 0 and llm._runner.n_past(0) == 2  # only its sequence was released
        again = llm.slot(1)
        assert again is not one and again.n_tokens == 0
        again.eval([1, 2])
        two = llm.slot(2)
    with pytest.raises(ValueError, match="closed"):
        two.eval([1])
    with pytest.raises(ValueError, match="n_seq_max must be between 1 and 256"):
        make(path, n_seq_max=0)
    with pytest.raises(TypeError, match="n_seq_max must be an integer"):
        make(path, n_seq_max=2.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="batch_wait_ms must be >= 0"):
            make(path, n_seq_max=2, batch_wait_ms=bad)
    for bad in (float("inf"), 60_001):  # a step could wait forever for a paused stream
        with pytest.raises(ValueError, match="at most 60000"):
            make(path, n_seq_max=2, batch_wait_ms=bad)


def test_kv_unified_shares_the_context(path: str) -> None:
    """kv_unified: each sequence may use all of n_ctx, the sequences a completion runs on stay within n_ctx
    together; a sequence whose completion ended gives its positions back."""
    with make(path, n_ctx=128, n_seq_max=2, kv_unified=True) as llm:
        a, b = llm.slot(0), llm.slot(1)
        p = list(range(5, 95))  # 90 tokens
        stream = a.create_completion(p, stream=True, max_tokens=20, temperature=0)
        next(stream)  # type: ignore[call-overload]  (a holds 90 + positions while its stream is open)
        with pytest.raises(ValueError, match="Context size has been exceeded"):
            b.create_completion(p, max_tokens=4, temperature=0)
        stream.close()  # type: ignore[union-attr]
        for prompt, n in ((p, 4), (list(range(5, 125)), 2)):  # the second: nearly all of n_ctx
            r = b.create_completion(prompt, max_tokens=n, temperature=0)
            assert r["usage"]["total_tokens"] == len(prompt) + n


def test_a_single_active_sequence_never_waits(path: str) -> None:
    """One completion on a context of four sequences with a long batch_wait_ms runs at the single-sequence pace
    (no step waits for the idle sequences)."""
    with make(path, n_seq_max=4, batch_wait_ms=2_000) as llm:
        t0 = time.monotonic()
        llm.create_completion(prompts()[0], **GREEDY)
        assert time.monotonic() - t0 < 2.0  # 8 steps that waited would take 16 s


def _fake_batcher(step_s: float, wait_s: float = 0.002) -> tuple[Any, list[list[int]]]:
    """A Batcher over a compute that sleeps `step_s` per step and records each step's sequence ids."""
    from llama_dsv4.batcher import Batcher

    steps: list[list[int]] = []

    def compute(seqs: list[tuple[int, list[int]]], all_logits: bool, n_threads: int) -> list[Any]:
        steps.append([s for s, _ in seqs])
        time.sleep(step_s)
        return [np.zeros((len(t), 4), np.float32) for _, t in seqs]

    return Batcher(compute, 64, wait_s), steps


def _stream(b: Any, seq_id: int, n: int, host_s: float = 0.0, pause_at: int = -1, pause_s: float = 0.0) -> int:
    """A decoding sequence: n one-token calls, `host_s` of work after each (sampling, streaming), and one pause."""
    b.set_active(seq_id, True)
    try:
        for i in range(n):
            b.eval(seq_id, [1], False, 1)
            time.sleep(pause_s if i == pause_at else host_s)
    finally:
        b.set_active(seq_id, False)
    return n


def test_a_step_waits_for_a_sequence_a_little_late() -> None:
    """A stream whose work between tokens outlasts batch_wait_ms but not a quarter of a step is waited for: the
    decode steps hold every stream (before, such streams fell into steps of their own, each step reading every
    weight again); stats() counts the steps and their sequences."""
    b, steps = _fake_batcher(step_s=0.08)
    barrier = threading.Barrier(4)

    def stream(seq_id: int, host_s: float) -> Any:
        barrier.wait()
        return _stream(b, seq_id, 8, host_s)

    run_threads([lambda i=i: stream(i, 0.006 if i == 3 else 0.0) for i in range(4)])
    full = sum(len(s) == 4 for s in steps)
    assert full >= len(steps) - 2, steps  # (the first step may start before every stream's first call)
    st = b.stats()
    assert st["steps"] == len(steps) and st["sequences"] == 32 and st["tokens"] == 32
    assert st["sequences_per_step"] == pytest.approx(32 / len(steps))
    assert st["ubatch_occupancy"] == pytest.approx(32 / len(steps) / 64)
    assert st["compute_seconds"] >= 0.08 * len(steps) * 0.9


def test_a_paused_sequence_costs_one_bounded_wait() -> None:
    """A stream that stops calling for a while (a client reading slowly) while it stays active is waited for once,
    at most a quarter of a step, then the others step without it until it calls again."""
    b, steps = _fake_batcher(step_s=0.04)
    barrier = threading.Barrier(3)

    def stream(seq_id: int, pause: bool) -> Any:
        barrier.wait()
        return _stream(b, seq_id, 12, pause_at=1 if pause else -1, pause_s=0.6 if pause else 0.0)

    t0 = time.monotonic()
    run_threads([lambda i=i: stream(i, i == 2) for i in range(3)])
    # the two other streams finish their 12 tokens during the pause: about 12 steps of 40 ms, plus one wait of
    # at most 10 ms (the pause is 600 ms; had every step waited its bound, their steps would take 50 ms each)
    assert b.stats()["gather_seconds"] < 0.1
    assert time.monotonic() - t0 < 1.5
    alone = [s for s in steps if 2 not in s]
    assert len(alone) >= 8, steps
