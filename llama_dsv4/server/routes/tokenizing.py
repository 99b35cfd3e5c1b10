"""POST /tokenize, /extras/tokenize, /extras/tokenize/count, /detokenize, /extras/detokenize.

They run beside the slots on a small pool of threads of their own (tokenizing releases the GIL, so the loop keeps
answering), and are bounded: at most TOKENIZE_MAX_CHARS characters of text and TOKENIZE_MAX_TOKENS tokens
(TOKENIZE_MAX_PIECES with_pieces), else 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...tokenizer import TooManyTokens
from .. import schemas
from ..body import read_body
from ..errors import APIError
from ..state import ServerState, State

TOKENIZE_MAX_TOKENS = 1 << 20  # the most /tokenize answers (DeepSeek V4's whole training context)
# ... of at most this many characters (more than 8 per token is no text; a text without a place to cut it, one
# long word, takes some 100 bytes of memory per byte to tokenize)
TOKENIZE_MAX_CHARS = 8 << 20
TOKENIZE_MAX_PIECES = 1 << 17  # ... with_pieces (an object per token)


router = APIRouter()


async def _off_loop(state: ServerState, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on the tokenize threads."""
    return await asyncio.get_running_loop().run_in_executor(state.text_work, functools.partial(fn, *args))


@contextlib.asynccontextmanager
async def _llama_of(state: ServerState, requested: str | None) -> AsyncIterator[Any]:
    """The asked model's first Llama, for work beside the slots (tokenizing); the model stays loaded meanwhile."""
    pool = await state.enter(state.models.pick(requested))
    try:
        yield pool.slots[0].llm
    finally:
        state.models.leave()


async def _tokenize(request: Request, state: ServerState, default_special: bool, key: str) -> Response:
    """The answer {key: ids or pieces} ("count": their number), made and encoded off the loop."""
    req, _ = await read_body(request, schemas.TokenizeRequest, state.settings)
    text = req.content if req.content is not None else req.input
    if text is None:
        raise APIError(400, "give the text to tokenize as 'content'", param="content")
    if len(text) > TOKENIZE_MAX_CHARS:
        raise APIError(
            413,
            f"the content is {len(text)} characters; /tokenize takes at most {TOKENIZE_MAX_CHARS}",
            param="content",
            code="request_too_large",
        )
    add = default_special if req.add_special is None else req.add_special
    limit = TOKENIZE_MAX_PIECES if req.with_pieces else TOKENIZE_MAX_TOKENS
    try:
        async with _llama_of(state, req.model) as llm:
            body = await _off_loop(state, _tokens, llm, text, add, req.parse_special, limit, req.with_pieces, key)
    except TooManyTokens as e:
        at_least = e.at_least
    else:
        return Response(body, media_type="application/json")
    # (raised here, not in the except clause: its context would keep the text alive)
    raise APIError(
        413,
        f"the content is at least {at_least} tokens; /tokenize answers at most {limit}"
        + (" with_pieces" if req.with_pieces else ""),
        param="content",
        code="request_too_large",
    )


async def _detokenize(request: Request, state: ServerState) -> str:
    req, _ = await read_body(request, schemas.DetokenizeRequest, state.settings)
    async with _llama_of(state, req.model) as llm:
        n_vocab = llm.n_vocab()
        bad = [t for t in req.tokens if t >= n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})", param="tokens")
        data = await _off_loop(state, llm.detokenize, req.tokens, None, True)
    return data.decode("utf-8", errors="replace")


@router.post("/tokenize")
async def tokenize(request: Request, state: State) -> Response:
    return await _tokenize(request, state, False, "tokens")


@router.post("/extras/tokenize")
async def extras_tokenize(request: Request, state: State) -> Response:
    return await _tokenize(request, state, True, "tokens")


@router.post("/extras/tokenize/count")
async def extras_tokenize_count(request: Request, state: State) -> Response:
    return await _tokenize(request, state, True, "count")


@router.post("/detokenize")
async def detokenize(request: Request, state: State) -> dict[str, Any]:
    return {"content": await _detokenize(request, state)}


@router.post("/extras/detokenize")
async def extras_detokenize(request: Request, state: State) -> dict[str, Any]:
    return {"text": await _detokenize(request, state)}


def _tokens(llm: Any, text: str, add_bos: bool, special: bool, limit: int, with_pieces: bool, key: str) -> bytes:
    """/tokenize's answer as JSON: {key: the ids of `text`, or {id, piece} objects} or {"count": how many};
    TooManyTokens past `limit`."""
    ids = llm.dsv4_tokenizer.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special, limit=limit)
    if key == "count":
        answer: dict[str, Any] = {"count": len(ids)}
    elif not with_pieces:
        answer = {key: ids}
    else:
        pieces = []
        for i in ids:
            b = llm.detokenize([i], special=True)
            try:
                pieces.append({"id": i, "piece": b.decode("utf-8")})
            except UnicodeDecodeError:
                pieces.append({"id": i, "piece": list(b)})
        answer = {key: pieces}
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
