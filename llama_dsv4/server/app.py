"""The OpenAI-compatible HTTP API (FastAPI): routes, request checking, streaming, API keys, request counting.

Every completion runs as a job on a slot (slots.py). A client that goes away while its request waits for a slot,
while it runs, or in the middle of a stream stops it at the next token and frees the slot. /tokenize and
/detokenize run on a small pool of their own threads (tokenizing releases the GIL, so the loop keeps answering),
and are bounded: at most TOKENIZE_MAX_CHARS characters of text and TOKENIZE_MAX_TOKENS tokens (TOKENIZE_MAX_PIECES
with_pieces), else 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..tokenizer import TooManyTokens
from . import choices, heap, schemas
from .errors import APIError, from_exception, from_validation
from .metrics import CONTENT_TYPE, Metrics
from .models import Model, ModelLoadError, ModelSet
from .settings import Settings
from .slots import Controller, Job, SlotPool

log = logging.getLogger("llama_dsv4.server")
M = TypeVar("M", bound=BaseModel)

ROUTES = (
    "/health",
    "/v1/health",
    "/v1/models",
    "/models",
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/tokenize",
    "/extras/tokenize",
    "/extras/tokenize/count",
    "/detokenize",
    "/extras/detokenize",
    "/metrics",
    "/props",
)
PUBLIC = {"/health", "/v1/health"}
TOKENIZE_MAX_TOKENS = 1 << 20  # the most /tokenize answers (DeepSeek V4's whole training context)
# ... of at most this many characters (more than 8 per token is no text; a text without a place to cut it, one
# long word, takes some 100 bytes of memory per byte to tokenize)
TOKENIZE_MAX_CHARS = 8 << 20
TOKENIZE_MAX_PIECES = 1 << 17  # ... with_pieces (an object per token)
TOKENIZE_THREADS = 2  # /tokenize and /detokenize requests worked on at once (more wait)


class ClientGone(Exception):
    pass


class _Watcher:
    """Watches the connection for the client going away (the request body must have been read already)."""

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                return

    async def race(self, aw: Awaitable[Any]) -> Any:
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({task, self._task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone

    def stop(self) -> None:
        self._task.cancel()


class _Counting:
    """ASGI middleware: counts responses by route and status for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")
        route = route if route in ROUTES else "other"
        status = {"code": 500}

        async def send_counted(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(route, status["code"])


class _GiveBackMemory:
    """ASGI middleware: soon after a request with a large body is answered, the memory it freed goes back to the
    OS (heap.give_back on a thread, at most once per heap.DELAY_S)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.scheduled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.get("state", {}).get("big_body") and not self.scheduled:  # (set by read_body)
                self.scheduled = True
                asyncio.get_running_loop().call_later(heap.DELAY_S, self._give_back)

    def _give_back(self) -> None:
        self.scheduled = False
        asyncio.get_running_loop().run_in_executor(None, heap.give_back)


class _RootPath:
    """ASGI middleware: the app is served under `root_path` too (behind a reverse proxy that keeps the prefix), as
    llama-cpp-python's server does with FastAPI's root_path."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def create_app(
    settings: Settings, pool: SlotPool, metrics: Metrics | None = None, models: ModelSet | None = None
) -> FastAPI:
    """The ASGI app over a pool of loaded slots (the caller owns loading; the app closes the pool at shutdown).
    `models`: the models served by name, `pool` being the first one's (default: the one model of `settings`)."""
    metrics = metrics or Metrics()
    models = models or ModelSet.single(settings, pool)
    max_body = int(settings.max_body_mib * 2**20)
    keys = [k.encode() for k in settings.api_keys]

    text_work = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        text_work.shutdown(wait=False, cancel_futures=True)
        if not await run_in_threadpool(models.close):
            log.warning("a generation is still running (a long prompt cannot be interrupted): exiting anyway")
            app.state.unfinished = True

    app = FastAPI(
        title="llama-dsv4",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.pool, app.state.metrics, app.state.settings, app.state.models = pool, metrics, settings, models
    app.state.unfinished = False

    def record(job: Job) -> None:
        if job.stats is not None:
            st = job.stats
            metrics.job(st.n_prompt, st.n_predicted, st.t_prompt, st.t_predict, st.cancelled)

    pool.on_job_end = models.on_job_end = record

    def loaded() -> tuple[list[Any], int]:
        """The loaded model's slots and queue depth (none while another model is being loaded)."""
        pool = models.pool
        return (pool.slots, pool.waiting) if pool is not None else ([], 0)

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        headers = (
            {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 503 else None
        )
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            err = APIError(404, f"no route {request.url.path}", code="not_found")
        else:
            err = APIError(e.status_code, str(e.detail), code=None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        err = from_exception(e)
        return JSONResponse(err.body(), status_code=err.status)

    # ------------------------------------------------------------------------------------------ helpers
    async def check_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(given.encode(), k) for k in keys):
            raise APIError(
                401,
                "Invalid API key (send it as 'Authorization: Bearer KEY')",
                "authentication_error",
                code="invalid_api_key",
            )

    async def read_body(request: Request, model: type[M]) -> tuple[M, dict[str, Any]]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise APIError(
                413,
                f"request body of {length} bytes is over the limit of {max_body} (--max-body-mib)",
                code="request_too_large",
            )
        data = bytearray()

        async def receive() -> None:
            async for chunk in request.stream():
                data.extend(chunk)
                if len(data) >= heap.BIG_BODY:
                    request.state.big_body = True
                if len(data) > max_body:
                    raise APIError(
                        413,
                        f"request body is over the limit of {max_body} bytes (--max-body-mib)",
                        code="request_too_large",
                    )

        try:
            await asyncio.wait_for(receive(), settings.timeout or None)
        except ClientDisconnect:
            raise APIError(400, "the client went away while sending the request", code="client_disconnected") from None
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request body took over {settings.timeout:g} s to arrive (--timeout)", code="request_timeout"
            ) from None
        try:
            raw = json.loads(data, parse_constant=_json_constant)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(raw), raw
        except ValidationError as e:
            raise from_validation(e) from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None

    def max_tokens(value: int | None, default: int | None) -> int | None:
        cap = settings.n_predict if settings.n_predict > 0 else None
        v = default if value is None else (value or None)  # 0: until the end of the text or of the context
        if cap is not None:
            v = cap if v is None else min(v, cap)
        return v

    def sampling(req: schemas._Sampling, model: Model) -> dict[str, Any]:
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

    async def constraints(gbnf: str | None, response_format: Any) -> Any:
        """The request's GBNF grammar compiled, and its response_format schema checked against the bounds, before
        the request queues for a slot: a bad or hostile one is refused at once (400), without holding a slot."""
        try:
            return await run_in_threadpool(_constraints, gbnf, response_format)
        except Exception as e:
            raise from_exception(e) from None

    async def run(
        request: Request,
        fn: Callable[[Any, Controller], Any],
        stream: bool,
        usage_chunk: dict[str, Any] | None,
        prompt_param: str,
        model: Model,
    ) -> Response:
        """Queue for a slot of `model` (loaded first if another model is), run `fn` there, and answer (JSON, or an
        SSE stream). The request holds the model until its job ends (`models.leave`)."""
        pool = await enter(model)
        if pool.busy >= len(pool.slots) and pool.waiting >= settings.max_queue:
            models.leave()
            raise APIError(
                503,
                f"all slots are busy and {pool.waiting} requests are waiting (--max-queue): try again later",
                "server_error",
                code="server_busy",
            )
        place = pool.enqueue()  # in the queue before anything awaits: the --max-queue check sees every request
        watcher = _Watcher(request)
        job: Job | None = None
        try:
            slot = await watcher.race(pool.wait(place))
            job = pool.start(slot, fn, stream, then=models.leave)
            kind, value = await watcher.race(job.next_event())
            if kind == "error":
                raise from_exception(value, prompt_param)
            if kind == "result":
                return JSONResponse(value)
            if kind != "chunk":  # cancelled (shutdown) or a stream without any chunk
                raise APIError(503, "the request was stopped before it produced anything", "server_error")
        except ClientGone:
            if job is not None:
                job.cancel()
            return Response(status_code=499)
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            raise
        finally:
            watcher.stop()
            if job is None:  # the slot was never put to work: leave the queue, or hand the slot on
                pool.abandon(place)
                models.leave()
        return EventSourceResponse(
            _events(job, value, usage_chunk),
            ping=15 if settings.sse_ping else 2**31,  # (an interval of 0 spins in some sse-starlette versions)
            send_timeout=settings.timeout or None,
            headers={"Cache-Control": "no-cache"},
        )

    async def enter(model: Model) -> SlotPool:
        try:
            return await models.enter(model)
        except ModelLoadError as e:
            raise APIError(500, str(e), "server_error", param="model", code="model_load_failed") from None

    async def _events(job: Job, first: Any, usage_chunk: dict[str, Any] | None) -> AsyncIterator[dict[str, str]]:
        finished = False
        last = first
        try:
            yield {"data": json.dumps(first, ensure_ascii=False)}
            while True:
                kind, value = await job.next_event()
                if kind == "chunk":
                    last = value
                    yield {"data": json.dumps(value, ensure_ascii=False)}
                elif kind == "error":
                    yield {"data": json.dumps(from_exception(value).body(), ensure_ascii=False)}
                elif kind == "end":
                    finished = True
                    if usage_chunk is not None and job.stats is not None:
                        st = job.stats
                        tail = {
                            **usage_chunk,
                            "id": last.get("id"),
                            "created": last.get("created"),
                            "model": last.get("model"),
                            "choices": [],
                            "usage": {
                                "prompt_tokens": st.n_prompt,
                                "completion_tokens": st.n_predicted,
                                "total_tokens": st.n_prompt + st.n_predicted,
                            },
                        }
                        yield {"data": json.dumps(tail)}
                    yield {"data": "[DONE]"}
                    return
        finally:
            if not finished:
                job.cancel()  # the client went away: stop at the next token

    # ------------------------------------------------------------------------------------------ routes
    public = APIRouter()
    api = APIRouter(dependencies=[Depends(check_key)])

    @public.get("/health")
    @public.get("/v1/health")
    async def health() -> dict[str, Any]:
        slots, _ = loaded()
        busy = sum(1 for s in slots if s.job is not None)
        return {"status": "ok", "slots_idle": len(slots) - busy, "slots_processing": busy}

    @api.get("/v1/models")
    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        slots, _ = loaded()
        data = []
        for name in models.names:
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": int(metrics.started),
                "owned_by": "llama-dsv4",
                "permissions": [],
            }
            if name == models.active and slots:
                entry["meta"] = {"n_ctx": slots[0].n_ctx, "slots": len(slots)}
            data.append(entry)
        return {"object": "list", "data": data}

    @api.get("/props")
    async def props() -> dict[str, Any]:
        slots, _ = loaded()
        llm = slots[0].llm if slots else None
        return {
            "model": models.active,
            "model_path": getattr(llm, "model_path", None),
            "n_ctx": slots[0].n_ctx if slots else None,
            "total_slots": len(slots),
            "chat_format": getattr(llm, "chat_format", None),
            "build_info": f"llama-dsv4 {__version__}",
        }

    @api.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        text = await run_in_threadpool(metrics.render, *loaded())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @api.post("/v1/chat/completions")
    @api.post("/chat/completions")
    async def chat(request: Request) -> Response:
        req, raw = await read_body(request, schemas.ChatRequest)
        model = models.pick(req.model)
        tk = {**model.settings.chat_template_kwargs, **(req.chat_template_kwargs or {})}
        if req.thinking is not None:
            tk["thinking"] = (
                req.thinking if isinstance(req.thinking, bool) else req.thinking.get("type") in ("enabled", True)
            )
        if req.reasoning_effort is not None:
            tk["reasoning_effort"] = req.reasoning_effort
        fmt = req.reasoning_format or settings.reasoning_format
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        kwargs = dict(
            sampling(req, model),
            messages=raw["messages"],
            tools=raw.get("tools"),
            tool_choice=raw.get("tool_choice"),
            parallel_tool_calls=req.parallel_tool_calls,
            functions=raw.get("functions"),
            function_call=raw.get("function_call"),
            response_format=_response_format(raw.get("response_format")),
            max_tokens=max_tokens(limit, None),
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs,
            reasoning_format="none" if fmt == "none" else "deepseek",
            chat_template_kwargs=tk,
            stream=req.stream,
        )
        choices.check(req.n, 1, kwargs["max_tokens"], pool.slots[0].n_ctx)
        grammar = await constraints(req.grammar, kwargs["response_format"])

        def fn(llm: Any, ctl: Controller) -> Any:
            def one(seed: int | None) -> Any:
                return llm.create_chat_completion(
                    **{**kwargs, "seed": seed}, grammar=grammar, logits_processor=ctl.processors()
                )

            return one(req.seed) if req.n == 1 else choices.run(llm, ctl, [one], req.n, req.seed, req.stream)

        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        usage = {"object": "chat.completion.chunk"} if include_usage else None
        return await run(request, fn, req.stream, usage, "messages", model)

    @api.post("/v1/completions")
    @api.post("/completions")
    async def completions(request: Request) -> Response:
        req, _ = await read_body(request, schemas.CompletionRequest)
        model = models.pick(req.model)
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
            sampling(req, model),
            suffix=req.suffix,
            max_tokens=max_tokens(req.max_tokens, 16),
            echo=req.echo,
            logprobs=req.logprobs,
            stream=req.stream,
        )
        choices.check(req.n, len(prompts), kwargs["max_tokens"], pool.slots[0].n_ctx)
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

        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        usage = {"object": "text_completion"} if include_usage else None
        return await run(request, fn, req.stream, usage, "prompt", model)

    @api.post("/v1/embeddings")
    @api.post("/embeddings")
    async def embeddings(request: Request) -> Response:
        await read_body(request, schemas.EmbeddingRequest)
        raise APIError(
            501,
            "embeddings are not available: DeepSeek V4 is a generative model without an embedding output",
            "not_implemented_error",
            param="model",
            code="embeddings_not_supported",
        )

    async def off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(text_work, functools.partial(fn, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def llama_of(requested: str | None) -> AsyncIterator[Any]:
        """The asked model's first Llama, for work beside the slots (tokenizing); the model stays loaded meanwhile."""
        pool = await enter(models.pick(requested))
        try:
            yield pool.slots[0].llm
        finally:
            models.leave()

    async def _tokenize(request: Request, default_special: bool, key: str) -> Response:
        """The answer {key: ids or pieces} ("count": their number), made and encoded off the loop."""
        req, _ = await read_body(request, schemas.TokenizeRequest)
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
            async with llama_of(req.model) as llm:
                body = await off_loop(_tokens, llm, text, add, req.parse_special, limit, req.with_pieces, key)
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

    @api.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await _tokenize(request, False, "tokens")

    @api.post("/extras/tokenize")
    async def extras_tokenize(request: Request) -> Response:
        return await _tokenize(request, True, "tokens")

    @api.post("/extras/tokenize/count")
    async def extras_tokenize_count(request: Request) -> Response:
        return await _tokenize(request, True, "count")

    async def _detokenize(request: Request) -> str:
        req, _ = await read_body(request, schemas.DetokenizeRequest)
        async with llama_of(req.model) as llm:
            n_vocab = llm.n_vocab()
            bad = [t for t in req.tokens if t >= n_vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})", param="tokens")
            data = await off_loop(llm.detokenize, req.tokens, None, True)
        return data.decode("utf-8", errors="replace")

    @api.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return {"content": await _detokenize(request)}

    @api.post("/extras/detokenize")
    async def extras_detokenize(request: Request) -> dict[str, Any]:
        return {"text": await _detokenize(request)}

    app.include_router(public)
    app.include_router(api)
    # browsers may call the API from any page, as llama-server allows (the API key still applies)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_Counting, metrics=metrics)
    app.add_middleware(_GiveBackMemory)
    if settings.root_path:
        app.add_middleware(_RootPath, root_path=settings.root_path)
    return app


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


def _response_format(rf: Any) -> Any:
    """OpenAI's response_format as the chat layer takes it (llama-cpp-python's json_object + schema too)."""
    if not isinstance(rf, dict) or rf.get("type") == "text":
        return None
    return rf


def _constraints(gbnf: str | None, response_format: Any) -> Any:
    """A request's GBNF grammar as a compiled LlamaGrammar (or None); its JSON schema, if any, bounded (it is
    compiled with the prompt)."""
    from ..chat import handlers
    from ..grammar import LlamaGrammar
    from ..sampling import constrained

    if response_format is not None:
        wanted, schema = handlers.schema_of(response_format)
        if wanted and schema is not None:
            constrained.parse_json_schema(schema)
    return None if gbnf is None else LlamaGrammar.from_string(gbnf, verbose=False)


def started_banner(settings: Settings, names: list[str] | None = None) -> str:
    scheme = "https" if settings.ssl_certfile else "http"
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    names = names or [settings.model_name]
    served = f"model {names[0]!r}" if len(names) == 1 else f"models {', '.join(map(repr, names))}"
    return f"listening on {scheme}://{host}:{settings.port}{settings.root_path} ({served}, {time.strftime('%X')})"
