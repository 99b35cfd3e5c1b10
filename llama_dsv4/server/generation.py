"""A completion request's generation arguments: sampling (the request's, else the server's defaults), the token
limit (capped by --n-predict), its grammar and response_format checked before it queues, the usage chunk of a
stream."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from . import schemas
from .errors import APIError, from_exception
from .models import Model
from .settings import Settings


def max_tokens(value: int | None, default: int | None, settings: Settings) -> int | None:
    """The request's max_tokens (None: `default`; 0: until the end of the text or of the context), at most
    --n-predict."""
    cap = settings.n_predict if settings.n_predict > 0 else None
    v = default if value is None else (value or None)
    if cap is not None:
        v = cap if v is None else min(v, cap)
    return v


def sampling(req: schemas._Sampling, model: Model, settings: Settings) -> dict[str, Any]:
    """The sampling keywords of `create_completion` / `create_chat_completion` for the request."""

    def pick(v: Any, d: Any) -> Any:
        return d if v is None else v

    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    if settings.n_predict == 0:
        raise APIError(400, "this server was started with --n-predict 0")
    return dict(
        temperature=pick(req.temperature, settings.temperature),
        top_p=pick(req.top_p, settings.top_p),
        min_p=pick(req.min_p, settings.min_p),
        typical_p=pick(req.typical_p, 1.0),
        top_k=pick(req.top_k, settings.top_k),
        repeat_penalty=pick(req.repeat_penalty, settings.repeat_penalty),
        presence_penalty=pick(req.presence_penalty, settings.presence_penalty),
        frequency_penalty=pick(req.frequency_penalty, settings.frequency_penalty),
        mirostat_mode=req.mirostat_mode,
        mirostat_tau=req.mirostat_tau,
        mirostat_eta=req.mirostat_eta,
        seed=req.seed,
        stop=req.stop,
        logit_bias=bias,
        model=model.name,
    )


def usage_chunk(req: schemas._Sampling, obj: str) -> dict[str, Any] | None:
    """The start of the usage chunk a stream ends with when stream_options.include_usage asks for it (else None)."""
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return {"object": obj} if include_usage else None


def response_format(rf: Any) -> Any:
    """OpenAI's response_format as the chat layer takes it (llama-cpp-python's json_object + schema too)."""
    if not isinstance(rf, dict) or rf.get("type") == "text":
        return None
    return rf


async def constraints(gbnf: str | None, rf: Any) -> Any:
    """The request's GBNF grammar compiled, and its response_format schema checked against the bounds, before
    the request queues for a slot: a bad or hostile one is refused at once (400), without holding a slot."""
    try:
        return await run_in_threadpool(_constraints, gbnf, rf)
    except Exception as e:
        raise from_exception(e) from None


def _constraints(gbnf: str | None, rf: Any) -> Any:
    """A request's GBNF grammar as a compiled LlamaGrammar (or None); its JSON schema, if any, bounded (it is
    compiled with the prompt)."""
    from ..chat.request import schema_of
    from ..grammar import LlamaGrammar
    from ..sampling import constrained

    if rf is not None:
        wanted, schema = schema_of(rf)
        if wanted and schema is not None:
            constrained.parse_json_schema(schema)
    return None if gbnf is None else LlamaGrammar.from_string(gbnf, verbose=False)
