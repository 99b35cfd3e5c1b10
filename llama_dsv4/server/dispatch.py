"""A completion request's job: queue for a slot (bounded by --max-queue), run there, answer with JSON or an SSE
stream. A client that goes away while its request waits for a slot, while it runs, or in the middle of a stream
stops it at the next token and frees the slot; a stream's reader paces its job (slots.Job's back-pressure)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from .errors import APIError, from_exception
from .models import Model
from .slots import Controller, Job
from .state import ServerState


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


async def run_job(
    state: ServerState,
    request: Request,
    fn: Callable[[Any, Controller], Any],
    stream: bool,
    usage_chunk: dict[str, Any] | None,
    prompt_param: str,
    model: Model,
    prompt_key: str | list[int] | tuple[str, ...] | None = None,
) -> Response:
    """Queue for a slot of `model` (loaded first if another model is), run `fn` there, and answer (JSON, or an
    SSE stream). The request holds the model until its job ends (`models.leave`). `prompt_key` picks among free
    slots the one whose last prompt shares the most with it (SlotPool.enqueue)."""
    settings, models = state.settings, state.models
    pool = await state.enter(model)
    if pool.busy >= len(pool.slots) and pool.waiting >= settings.max_queue:
        models.leave()
        raise APIError(
            503,
            f"all slots are busy and {pool.waiting} requests are waiting (--max-queue): try again later",
            "server_error",
            code="server_busy",
        )
    place = pool.enqueue(prompt_key)  # in the queue before anything awaits: the --max-queue check sees every request
    watcher = _Watcher(request)
    job: Job | None = None
    try:
        slot = await watcher.race(pool.wait(place))
        job = pool.start(slot, fn, stream, then=models.leave)
        kind, value = await watcher.race(job.next_event())
        if kind == "error":
            raise from_exception(value, prompt_param)
        if kind == "result":
            await watcher.race(job.released.wait())  # the worker's last bookkeeping: microseconds
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
                await job.released.wait()
                yield {"data": "[DONE]"}
                return
    finally:
        if not finished:
            job.cancel()  # the client went away: stop at the next token
