"""Continuous batching through the API (docs/batching.md): `Llama(n_seq_max=N)`, its slots, `create_completions`,
and the batcher that merges the sequences' evaluations from their threads into shared ubatches."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from llama_dsv4 import Llama
from llama_dsv4.batcher import Batcher

# prompts of different lengths: with the 4-token and 128-token blocks of the tiny model, the sequences complete
# blocks at different steps while they decode together (and the longest is split over several steps)
LENGTHS = (3, 41, 126, 200)
MAX_TOKENS = 14


def prompts(n: int = len(LENGTHS)) -> list[list[int]]:
    rng = np.random.default_rng(16)
    return [[int(t) for t in rng.integers(3, 500, LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS))] for i in range(n)]


def texts(responses: list) -> list[str]:
    return [r["choices"][0]["text"] for r in responses]


@pytest.fixture(scope="module")
def alone(tiny_paths: dict[str, str]) -> list[str]:
    """Each prompt's greedy completion on a Llama of one sequence."""
    with Llama(model_path=tiny_paths["f32"], n_ctx=512, n_batch=64, verbose=False) as llm:
        return [
            llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"] for p in prompts(8)
        ]


@pytest.fixture()
def llm(tiny_paths: dict[str, str]):
    with Llama(model_path=tiny_paths["f32"], n_ctx=512, n_batch=64, n_seq_max=4, verbose=False) as it:
        yield it


def test_create_completions_equal_each_prompt_alone_and_share_steps(llm: Llama, alone: list[str]) -> None:
    """Eight prompts on four sequences: the responses come back in order, each the completion its prompt gets
    alone, and the sequences really share ubatches (steps of up to four sequences, far fewer steps than tokens)."""
    out = llm.create_completions(prompts(8), max_tokens=MAX_TOKENS, temperature=0)
    assert texts(out) == alone
    stats = llm._runner.batcher.stats
    assert stats.most_sequences == 4
    assert stats.steps < 8 * MAX_TOKENS  # one step per token of each sequence would be 8 * 14 (plus the prompts)


def test_one_sequence_keeps_the_direct_path(tiny_paths: dict[str, str], alone: list[str]) -> None:
    """n_seq_max=1 (the default) has no batcher; create_completions runs the prompts one after another."""
    with Llama(model_path=tiny_paths["f32"], n_ctx=512, n_batch=64, verbose=False) as one:
        assert one._runner.batcher is None
        assert texts(one.create_completions(prompts(2), max_tokens=MAX_TOKENS, temperature=0)) == alone[:2]


def test_streams_join_and_leave_mid_generation(llm: Llama, alone: list[str]) -> None:
    """A stream that starts while another is decoding joins the next steps; a stream closed half-way frees its
    sequence at once (the others go on, and the slot answers its next request correctly)."""
    ps = prompts()
    first = llm.slot(1).create_completion(ps[0], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    got_first = [next(first)["choices"][0]["text"] for _ in range(3)]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = llm.slot(i).create_completion(ps[i], max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"]

    joined = threading.Thread(target=run, args=(2,))
    joined.start()
    got_first += [c["choices"][0]["text"] for c in first]
    joined.join()
    assert "".join(got_first) == alone[0]
    assert results[2] == alone[2]

    leaving = llm.slot(3).create_completion(ps[1], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    next(leaving)
    other = threading.Thread(target=run, args=(2,))
    other.start()
    leaving.close()  # the client went away
    other.join()
    assert results[2] == alone[2]
    assert llm.slot(3).create_completion(ps[3], max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"] == alone[3]


def test_slots(llm: Llama) -> None:
    """slot(0) is the Llama itself, slot(i) the same object each time; bad indices are ValueErrors; closing a slot
    frees its sequence only; closing the owner closes every slot."""
    assert llm.slot(0) is llm
    s2 = llm.slot(2)
    assert llm.slot(2) is s2 and s2.slot(1) is llm.slot(1)
    for bad in (-1, 4, 1.0, True, "1"):
        with pytest.raises(ValueError, match="outside this Llama's sequences"):
            llm.slot(bad)  # type: ignore[arg-type]
    s2.create_completion(prompts()[0], max_tokens=2)
    assert llm._runner.n_past(2) > 0
    s2.close()
    assert llm._runner.n_past(2) == 0
    assert llm.create_completion(prompts()[0], max_tokens=2)["choices"][0]["text"]  # the owner goes on
    s1 = llm.slot(1)
    llm.close()
    with pytest.raises(ValueError, match="closed"):
        s1.create_completion(prompts()[0], max_tokens=2)


@pytest.mark.parametrize("bad", [0, 257, -1, 2.0, True, "2"])
def test_bad_n_seq_max(tiny_paths: dict[str, str], bad: object) -> None:
    with pytest.raises(ValueError, match="n_seq_max must be an integer from 1 to 256"):
        Llama(model_path=tiny_paths["f32"], n_seq_max=bad, verbose=False)  # type: ignore[arg-type]


def test_create_completions_refuses_streams_and_raises_the_first_error(llm: Llama) -> None:
    with pytest.raises(ValueError, match="whole responses"):
        llm.create_completions(prompts(2), stream=True)
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completions([*prompts(2), [7] * 600], max_tokens=2)


# ------------------------------------------------------------------------------------------------- the batcher alone


class Recorder:
    """A stand-in for Runner.eval_batch: records each step's (seq_id, tokens), returns logits rows whose value is
    the token, fails for a poisoned seq_id."""

    def __init__(self, poison: int | None = None, delay: float = 0.0) -> None:
        self.steps: list[list[tuple[int, list[int]]]] = []
        self.poison, self.delay = poison, delay

    def __call__(self, seqs: list[tuple[int, list[int]]], all_logits: bool, n_threads: int) -> list[np.ndarray]:
        self.steps.append([(s, list(t)) for s, t in seqs])
        time.sleep(self.delay)
        if any(s == self.poison for s, _ in seqs):
            raise MemoryError("no room for this step")
        return [np.array([[float(t)] for t in (toks if all_logits else toks[-1:])]) for _, toks in seqs]


def run_all(b: Batcher, calls: list[tuple[int, list[int], bool]]) -> dict[int, object]:
    out: dict[int, object] = {}

    def one(seq: int, toks: list[int], all_logits: bool) -> None:
        try:
            out[seq] = b.eval(seq, toks, all_logits, 1)
        except Exception as e:  # handed to the assertions
            out[seq] = e

    threads = [threading.Thread(target=one, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a call hangs"
    return out


def test_batcher_splits_prompts_and_returns_what_eval_returns() -> None:
    """Decode calls go whole, prompts in chunks within n_ubatch; each call gets the rows it asked for."""
    rec = Recorder(delay=0.01)
    b = Batcher(rec, n_ubatch=8, wait_s=0.05)
    for s in (0, 1, 2):
        b.activate(s)
    out = run_all(b, [(0, [5], False), (1, list(range(10, 30)), True), (2, list(range(40, 45)), False)])
    assert np.array_equal(out[0], [[5.0]])
    assert np.array_equal(out[1], np.arange(10, 30, dtype=float)[:, None])
    assert np.array_equal(out[2], [[44.0]])
    assert all(sum(len(t) for _, t in step) <= 8 for step in rec.steps)
    assert rec.steps[0][0] == (0, [5])  # the decode call first, whole
    # the active sequences lined up: the first step is full (the decode call and 7 prompt tokens)
    assert len(rec.steps[0]) >= 2 and sum(len(t) for _, t in rec.steps[0]) == 8


def test_an_error_reaches_the_calls_of_its_step_only() -> None:
    """A step that fails (MemoryError for seq 1) raises in the calls it held; a later step's calls succeed; nobody
    hangs."""
    rec = Recorder(poison=1, delay=0.01)
    b = Batcher(rec, n_ubatch=4, wait_s=0.0)
    out = run_all(b, [(0, [1, 2, 3, 4, 5, 6, 7, 8, 9], False), (1, [7], False)])
    assert isinstance(out[1], MemoryError)
    failed_with_1 = any(0 in {s for s, _ in step} and 1 in {s for s, _ in step} for step in rec.steps)
    if failed_with_1:
        assert isinstance(out[0], MemoryError)
    else:
        assert np.array_equal(out[0], [[9.0]])
    assert np.array_equal(b.eval(2, [3], False, 1), [[3.0]])  # the batcher goes on
    assert b.stats.steps == len(rec.steps)


def test_a_single_active_sequence_never_waits() -> None:
    """With one active sequence the step starts at once (wait_s far above the time measured)."""
    b = Batcher(Recorder(), n_ubatch=8, wait_s=5.0)
    b.activate(0)
    t = time.monotonic()
    for tok in range(20):
        b.eval(0, [tok], False, 1)
    assert time.monotonic() - t < 2.5
    b.deactivate(0)


# ------------------------------------------------------------------------------------------------- the server


def test_server_16_concurrent_streams_on_4_batched_slots(real_vocab_path: str, tmp_path: Any) -> None:
    """16 concurrent greedy streams (prompts of different lengths) on --parallel 4 with continuous batching: every
    stream completes, and each gets the tokens its prompt gets when it is the only request."""
    import asyncio
    import json

    import httpx
    from test_server import AUTH, start_server

    srv = start_server(real_vocab_path, str(tmp_path / "server.log"), "-np", "4", "-t", "2")
    try:
        rng = np.random.default_rng(7)
        bodies = [
            {"prompt": [int(t) for t in rng.integers(100, 20000, 3 + 9 * i)], "max_tokens": 10, "temperature": 0}
            for i in range(16)
        ]

        async def one(c: httpx.AsyncClient, body: dict) -> list[int]:
            tokens: list[int] = []
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True, "logprobs": 1}) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        lp = json.loads(line[6:])["choices"][0]["logprobs"]
                        tokens += lp["tokens"] if lp else []
            return tokens

        async def run(concurrent: bool) -> list[list[int]]:
            async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as c:
                if concurrent:
                    return list(await asyncio.gather(*(one(c, b) for b in bodies)))
                return [await one(c, b) for b in bodies]

        together = asyncio.run(run(True))
        alone = asyncio.run(run(False))
        assert all(len(t) == 10 for t in together), [len(t) for t in together]
        assert together == alone
        assert "continuous batching: the 4 slots share one context" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()
