"""Log probabilities of generated tokens without logits_all (completion and chat shapes, streamed and whole), and
several answers to one prompt sharing its evaluation (Llama.sequence.shared_prompt, what the server's `n` runs on)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from forward_models import GREEDY, SEED

from llama_dsv4 import Llama, LogitsProcessorList
from llama_dsv4.engine import runtime
from llama_dsv4.model.writer import write_model

PROMPT = list(range(3, 43))  # 40 token ids of the small vocabulary
MSGS = [{"role": "user", "content": "Tell me a story."}]


def make(path: str, **kw: Any) -> Llama:
    return Llama(path, n_ctx=256, n_batch=64, verbose=False, n_threads=1, n_threads_batch=1, **kw)


@pytest.fixture(scope="module")
def greedy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    params, init = GREEDY
    path = os.path.join(tmp_path_factory.mktemp("lp"), "greedy.gguf")
    return write_model(path, params, dtype="f32", vocab="small", init=init, seed=SEED)[0]


@pytest.fixture(scope="module")
def plain(greedy_path: str) -> Llama:
    return make(greedy_path)


@pytest.fixture(scope="module")
def full(greedy_path: str) -> Llama:
    return make(greedy_path, logits_all=True)


@pytest.fixture(scope="module")
def chat_llm(real_vocab_path: str) -> Llama:
    return Llama(real_vocab_path, n_ctx=512, verbose=False, n_threads=1, n_threads_batch=1)


def pick_second() -> LogitsProcessorList:
    """Sampling modified: greedy decoding takes the second most likely token of the raw logits."""

    def proc(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.full_like(scores, -1e9)
        out[np.argsort(-scores, kind="stable")[1]] = 0
        return out

    return LogitsProcessorList([proc])


def test_completion_logprobs_without_logits_all_are_log_softmax_of_the_raw_logits(plain: Llama, full: Llama) -> None:
    """The values are log-softmax of the logits the step sampled from (llama-cpp-python's): compared with the
    scores a logits_all=True Llama keeps for every position, also when a logits processor changed the choice."""
    for proc in (None, pick_second()):
        got = plain(PROMPT, max_tokens=6, temperature=0.0, logprobs=3, logits_processor=proc)
        ref = full(PROMPT, max_tokens=6, temperature=0.0, logprobs=3, logits_processor=proc)
        lp, rf = got["choices"][0]["logprobs"], ref["choices"][0]["logprobs"]
        assert got["choices"][0]["text"] == ref["choices"][0]["text"]
        assert lp["tokens"] == rf["tokens"] and lp["text_offset"] == rf["text_offset"]
        assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
        n = len(PROMPT)  # the logits_all run's scores and tokens (the first 5 generated were evaluated)
        expect = [float(Llama.logits_to_logprobs(full.scores[n + i - 1])[full.input_ids[n + i]]) for i in range(5)]
        np.testing.assert_allclose(lp["token_logprobs"][:5], expect, rtol=0, atol=1e-4)
        np.testing.assert_allclose(lp["token_logprobs"], rf["token_logprobs"], rtol=0, atol=1e-4)
        for top, rtop, chosen, v in zip(
            lp["top_logprobs"], rf["top_logprobs"], lp["tokens"], lp["token_logprobs"], strict=True
        ):
            assert list(top) == list(rtop) and 1 <= len(top) <= 4 and top[chosen] == v  # (keyed by text)
            assert list(top.values())[:3] == sorted(list(top.values())[:3], reverse=True)
        if proc is not None:  # the second most likely token each time: below the best of the raw logits
            best = [float(Llama.logits_to_logprobs(full.scores[n + i - 1]).max()) for i in range(5)]
            assert all(v < b - 1e-6 for v, b in zip(lp["token_logprobs"], best, strict=False))
        assert lp["text_offset"][0] == len(plain.detokenize(PROMPT).decode("utf-8", "replace"))


def test_streamed_logprobs_are_the_whole_ones(plain: Llama) -> None:
    whole = plain(PROMPT, max_tokens=8, temperature=0.0, logprobs=2)["choices"][0]["logprobs"]
    chunks = list(plain(PROMPT, max_tokens=8, temperature=0.0, logprobs=2, stream=True))
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert chunks[-1]["choices"][0]["logprobs"] is None and chunks[-1]["choices"][0]["finish_reason"] == "length"
    for key in ("tokens", "text_offset", "token_logprobs", "top_logprobs"):
        assert [x for p in parts for x in p[key]] == whole[key]


def test_prompt_logprobs_need_logits_all(plain: Llama, full: Llama) -> None:
    """echo=True with logprobs reports the prompt's tokens too: that needs every prompt position's logits."""
    with pytest.raises(ValueError, match=r"echo=True.*logits_all=True \(server: --logits-all\)"):
        plain(PROMPT, max_tokens=2, logprobs=1, echo=True)
    lp = full(PROMPT, max_tokens=2, logprobs=1, echo=True, temperature=0.0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 2 and lp["token_logprobs"][0] is None


def test_chat_logprobs_shape(chat_llm: Llama) -> None:
    """OpenAI's chat shape: content[] of {token, logprob, bytes, top_logprobs: exactly top_logprobs entries}."""
    r = chat_llm.create_chat_completion(MSGS, max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None and len(lp["content"]) == 5
    text = b""
    for e in lp["content"]:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        assert bytes(e["bytes"]).decode("utf-8", "ignore") == e["token"]
        tops = e["top_logprobs"]
        assert len(tops) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in tops)
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == e["token"] and tops[0]["logprob"] == e["logprob"]  # greedy: the best one
        text += bytes(e["bytes"])
    assert text.decode("utf-8", "replace") == r["choices"][0]["message"]["content"]
    r0 = chat_llm.create_chat_completion(MSGS, max_tokens=2, temperature=0.0, logprobs=True)
    assert [e["top_logprobs"] for e in r0["choices"][0]["logprobs"]["content"]] == [[], []]
    assert chat_llm.create_chat_completion(MSGS, max_tokens=2)["choices"][0]["logprobs"] is None

    # streamed: every token's entry once, in order, on the chunks
    chunks = list(
        chat_llm.create_chat_completion(MSGS, max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3, stream=True)
    )
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == lp["content"]


def test_answers_to_one_prompt_share_its_evaluation(greedy_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside Llama.sequence.shared_prompt() the prompt is evaluated once: each further answer restarts from the
    state saved after it, and answers exactly as a fresh Llama does (greedy, and seeded sampling)."""
    llm = make(greedy_path)
    counted = {"n": 0}
    rebuilt: list[int] = []  # positions each truncation evaluated again

    class Counting:  # the engine context, counting the positions it evaluates
        def __init__(self, ctx: Any) -> None:
            self.__dict__["ctx"] = ctx

        def __getattr__(self, k: str) -> Any:
            return getattr(self.ctx, k)

        def __setattr__(self, k: str, v: Any) -> None:
            setattr(self.ctx, k, v)

        def eval(self, toks: Any, **kw: Any) -> Any:
            counted["n"] += len(toks)
            return self.ctx.eval(toks, **kw)

        def truncate(self, toks: Any, *a: Any, **kw: Any) -> Any:
            n = self.ctx.truncate(toks, *a, **kw)
            rebuilt.append(n)
            counted["n"] += n
            return n

    llm.sequence.runner.context = Counting(llm._ctx)
    fresh = make(greedy_path)
    greedy = fresh(PROMPT, max_tokens=5, temperature=0.0)["choices"][0]["text"]
    sampled = [
        fresh(PROMPT, max_tokens=5, temperature=1.0, top_k=0, min_p=0.0, seed=s)["choices"][0]["text"] for s in (11, 12)
    ]
    with llm.sequence.shared_prompt():
        answers = [llm(PROMPT, max_tokens=5, temperature=0.0)["choices"][0]["text"] for _ in range(3)]
        answers += [
            llm(PROMPT, max_tokens=5, temperature=1.0, top_k=0, min_p=0.0, seed=s)["choices"][0]["text"]
            for s in (11, 12)
        ]
    assert answers == [greedy] * 3 + sampled and sampled[0] != sampled[1]
    assert counted["n"] == len(PROMPT) + 5 * 4  # the prompt once, then 4 positions per answer
    counted["n"] = 0
    rebuilt.clear()
    for _ in range(2):  # outside: each answer cuts the sequence back into the prompt (Context.truncate rebuilds
        llm(PROMPT, max_tokens=5, temperature=0.0)  # the compressor rows it lost) and evaluates its last token again
    assert len(rebuilt) == 2 and all(0 < n < len(PROMPT) // 2 for n in rebuilt), rebuilt
    assert counted["n"] == sum(rebuilt) + 2 * (1 + 4)
    assert llm.sequence._fork is None

    # a saved state must take at most a quarter of the available memory: else no state is saved, and each answer
    # goes back into the prompt by truncation, as outside
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 1000)
    counted["n"] = 0
    rebuilt.clear()
    with llm.sequence.shared_prompt():
        assert llm.sequence._fork is None
        assert [llm(PROMPT, max_tokens=5, temperature=0.0)["choices"][0]["text"] for _ in range(2)] == [greedy] * 2
    assert len(rebuilt) == 2 and counted["n"] == sum(rebuilt) + 2 * (1 + 4)
