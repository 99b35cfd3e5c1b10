"""POST /v1/chat/completions, /chat/completions and /v1/completions, /completions: a chat or text completion
(one prompt or a list, n choices each, streamed or not) run as a job on a slot (dispatch.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import choices, schemas
from ..body import read_body
from ..dispatch import run_job
from ..errors import APIError
from ..generation import constraints, max_tokens, response_format, sampling, usage_chunk
from ..slots import Controller
from ..state import State

router = APIRouter()


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat(request: Request, state: State) -> Response:
    req, raw = await read_body(request, schemas.ChatRequest, state.settings)
    model = state.models.pick(req.model)
    tk = {**model.settings.chat_template_kwargs, **(req.chat_template_kwargs or {})}
    if req.thinking is not None:
        tk["thinking"] = (
            req.thinking if isinstance(req.thinking, bool) else req.thinking.get("type") in ("enabled", True)
        )
    if req.reasoning_effort is not None:
        tk["reasoning_effort"] = req.reasoning_effort
    fmt = req.reasoning_format or state.settings.reasoning_format
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    kwargs = dict(
        sampling(req, model, state.settings),
        messages=raw["messages"],
        tools=raw.get("tools"),
        tool_choice=raw.get("tool_choice"),
        parallel_tool_calls=req.parallel_tool_calls,
        functions=raw.get("functions"),
        function_call=raw.get("function_call"),
        response_format=response_format(raw.get("response_format")),
        max_tokens=max_tokens(limit, None, state.settings),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
        reasoning_format="none" if fmt == "none" else "deepseek",
        chat_template_kwargs=tk,
        stream=req.stream,
    )
    choices.check(req.n, 1, kwargs["max_tokens"], state.pool.slots[0].n_ctx)
    grammar = await constraints(req.grammar, kwargs["response_format"])

    def fn(llm: Any, ctl: Controller) -> Any:
        def one(seed: int | None) -> Any:
            return llm.create_chat_completion(
                **{**kwargs, "seed": seed}, grammar=grammar, logits_processor=ctl.processors()
            )

        return one(req.seed) if req.n == 1 else choices.run(llm, ctl, [one], req.n, req.seed, req.stream)

    usage = usage_chunk(req, "chat.completion.chunk")
    key = tuple(json.dumps(m, ensure_ascii=False, sort_keys=True) for m in raw["messages"])  # slots.overlap
    return await run_job(state, request, fn, req.stream, usage, "messages", model, key)


@router.post("/v1/completions")
@router.post("/completions")
async def completions(request: Request, state: State) -> Response:
    req, _ = await read_body(request, schemas.CompletionRequest, state.settings)
    model = state.models.pick(req.model)
    if req.logprobs is not None and req.echo and not model.settings.logits_all:
        raise APIError(
            400,
            "logprobs with echo include the prompt's tokens, whose log probabilities need the logits of every "
            "prompt position: start the server with --logits-all (logprobs without echo need nothing more)",
            param="echo",
        )
    # one prompt (text or token ids) or a list of them: OpenAI's four forms
    p = req.prompt
    prompts: list[Any] = p if isinstance(p, list) and isinstance(p[0], (str, list)) else [p]
    kwargs = dict(
        sampling(req, model, state.settings),
        suffix=req.suffix,
        max_tokens=max_tokens(req.max_tokens, 16, state.settings),
        echo=req.echo,
        logprobs=req.logprobs,
        stream=req.stream,
    )
    choices.check(req.n, len(prompts), kwargs["max_tokens"], state.pool.slots[0].n_ctx)
    grammar = await constraints(req.grammar, None)

    def fn(llm: Any, ctl: Controller) -> Any:
        def answer(prompt: Any) -> Callable[[int | None], Any]:
            return lambda seed: llm.create_completion(
                prompt, **{**kwargs, "seed": seed}, grammar=grammar, logits_processor=ctl.processors()
            )

        if req.n == 1 and len(prompts) == 1:
            return answer(prompts[0])(req.seed)
        choices.check_prompts(llm, prompts, req.suffix)
        return choices.run(llm, ctl, [answer(q) for q in prompts], req.n, req.seed, req.stream)

    usage = usage_chunk(req, "text_completion")
    key = prompts[0] if len(prompts) == 1 else None
    return await run_job(state, request, fn, req.stream, usage, "prompt", model, key)
