"""The OpenAI-compatible HTTP API (FastAPI): the app made of the routers in routes/, over the shared state
(state.py), with OpenAI error bodies and the middleware (middleware.py).

Every completion runs as a job on a slot (slots.py, dispatch.py); /tokenize and /detokenize run beside the slots
on threads of their own (routes/tokenizing.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import routes
from .errors import APIError, from_exception
from .metrics import Metrics
from .middleware import Counting, GiveBackMemory, RootPath
from .models import ModelSet
from .routes.tokenizing import TOKENIZE_MAX_CHARS, TOKENIZE_MAX_PIECES, TOKENIZE_MAX_TOKENS
from .settings import Settings
from .slots import Job, SlotPool
from .state import ServerState

__all__ = ["TOKENIZE_MAX_CHARS", "TOKENIZE_MAX_PIECES", "TOKENIZE_MAX_TOKENS", "create_app", "started_banner"]

log = logging.getLogger("llama_dsv4.server")


def create_app(
    settings: Settings, pool: SlotPool, metrics: Metrics | None = None, models: ModelSet | None = None
) -> FastAPI:
    """The ASGI app over a pool of loaded slots (the caller owns loading; the app closes the pool at shutdown).
    `models`: the models served by name, `pool` being the first one's (default: the one model of `settings`)."""
    metrics = metrics or Metrics()
    models = models or ModelSet.single(settings, pool)
    state = ServerState(settings, pool, models, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.text_work.shutdown(wait=False, cancel_futures=True)
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
    app.state.server = state
    app.state.pool, app.state.metrics, app.state.settings, app.state.models = pool, metrics, settings, models
    app.state.unfinished = False

    def record(job: Job) -> None:
        if job.stats is not None:
            st = job.stats
            metrics.job(st.n_prompt, st.n_predicted, st.t_prompt, st.t_predict, st.cancelled)

    pool.on_job_end = models.on_job_end = record
    _error_handlers(app)
    paths = routes.include(app, settings.api_keys)
    # browsers may call the API from any page, as llama-server allows (the API key still applies)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Counting, metrics=metrics, routes=paths)
    app.add_middleware(GiveBackMemory)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error answers with OpenAI's error body (errors.py)."""

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


def started_banner(settings: Settings, names: list[str] | None = None) -> str:
    """The line logged once the server listens: its address and the models it serves."""
    scheme = "https" if settings.ssl_certfile else "http"
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    names = names or [settings.model_name]
    served = f"model {names[0]!r}" if len(names) == 1 else f"models {', '.join(map(repr, names))}"
    return f"listening on {scheme}://{host}:{settings.port}{settings.root_path} ({served}, {time.strftime('%X')})"
