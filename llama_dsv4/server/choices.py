"""Several choices in one request: OpenAI's `n`, and a list of prompts on /v1/completions.

The choices run one after another on the request's slot, in OpenAI's order: choice `index = prompt_index * n + j`.
The answers to one prompt share its evaluation: inside `Llama.sequence.shared_prompt()` the state right after the
prompt is saved once and every further answer restarts from it (one prompt evaluation per prompt, not per answer).
With a `seed`,
answer j samples with a seed derived from (seed, j), answer 0 with the seed itself (so the first of n answers is
the n=1 answer); without one, each answer draws its own. At temperature 0 the answers are the same.

A response holds every choice; its usage counts each prompt once and sums the completion tokens. A stream sends
each choice's chunks in turn (one id for all, each chunk naming its choice's index).

Bounds (400 naming the bound beyond them): at most MAX_CHOICES choices (n times the prompts), and at most
BUDGET_CONTEXTS slot contexts of generated tokens in all (choices x max_tokens, an unset max_tokens counting as the
slot's context), so that one request holds a slot no longer than a few whole-context answers would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..completion import prompt_tokens_of
from .errors import APIError
from .schemas import MAX_CHOICES
from .slots import Controller

BUDGET_CONTEXTS = 4

# one choice: given its seed, the response (stream=False) or its chunks
Choice = Callable[[int | None], Any]


def check(n: int, n_prompts: int, max_tokens: int | None, n_ctx: int) -> None:
    """400 unless `n` answers to each of `n_prompts` prompts fit the bounds (module docstring)."""
    k = n * n_prompts
    if k > MAX_CHOICES:
        what = f"n={n}" if n_prompts == 1 else f"{n_prompts} prompts x n={n}"
        raise APIError(
            400,
            f"{what} asks for {k} choices; this server answers at most {MAX_CHOICES} choices per request",
            param="n" if n_prompts == 1 else "prompt",
        )
    per = max_tokens or n_ctx
    if k > 1 and k * per > BUDGET_CONTEXTS * n_ctx:
        unset = "" if max_tokens else " (unset: the slot's context)"
        raise APIError(
            400,
            f"{k} choices x max_tokens {per}{unset} = {k * per} tokens is over this server's limit of "
            f"{BUDGET_CONTEXTS * n_ctx} generated tokens per request ({BUDGET_CONTEXTS} contexts of {n_ctx}): "
            "lower n or max_tokens",
            param="max_tokens",
        )


def seed_of(seed: int | None, j: int) -> int | None:
    """The seed of answer `j` to a prompt (None: each answer draws its own)."""
    if seed is None or j == 0:
        return seed
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, j]).generate_state(1, np.uint64)[0])


def check_prompts(llm: Any, prompts: list[Any], suffix: str | None) -> None:
    """Every prompt fits the context and has only known token ids, before anything is generated (a stream fails
    whole with a 400, not after the first prompts' answers)."""
    if len(prompts) > 1:
        for p in prompts:
            prompt_tokens_of(llm, p, suffix)


def run(llm: Any, ctl: Controller, choices: list[Choice], n: int, seed: int | None, stream: bool) -> Any:
    """All `n` answers to each of `choices` (one per prompt): the merged response, or the chunks of every choice."""
    if stream:
        return _stream(llm, ctl, choices, n, seed)
    with _sharing(llm):
        merged: dict[str, Any] = {}
        out: list[dict[str, Any]] = []
        n_prompt = n_completion = 0
        for p, choice in enumerate(choices):
            for j in range(n):
                r = choice(seed_of(seed, j))
                merged = merged or r
                out.append({**r["choices"][0], "index": p * n + j})
                n_prompt += r["usage"]["prompt_tokens"] if j == 0 else 0
                n_completion += r["usage"]["completion_tokens"]
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}
    return {**merged, "choices": out, "usage": usage}


def _stream(llm: Any, ctl: Controller, choices: list[Choice], n: int, seed: int | None) -> Iterator[dict[str, Any]]:
    first: dict[str, Any] = {}
    n_prompt = n_completion = 0
    with _sharing(llm):
        for p, choice in enumerate(choices):
            for j in range(n):
                ctl.new_choice()
                start, finish = ctl.n_sampled, None
                chunks = choice(seed_of(seed, j))
                try:
                    for c in chunks:
                        first = first or {"id": c["id"], "created": c["created"]}
                        ch = c["choices"][0]
                        finish = ch["finish_reason"] or finish
                        yield {**c, **first, "choices": [{**ch, "index": p * n + j}]}
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
                sampled = ctl.n_sampled - start
                # the end-of-text token is sampled but not generated text (after a stop string this is one short)
                n_completion += sampled - (1 if sampled and finish in ("stop", "tool_calls") else 0)
                n_prompt += ctl.choice_prompt if j == 0 else 0
    ctl.usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion}


def _sharing(llm: Any) -> contextlib.AbstractContextManager[Any]:
    """The answers to one prompt share its evaluation (a stand-in Llama without `sequence.shared_prompt` evaluates
    each)."""
    share = getattr(getattr(llm, "sequence", None), "shared_prompt", None)
    return share() if share is not None else contextlib.nullcontext()
