"""The app's ASGI middleware: requests counted by route and status, memory handed back after large bodies, the
API served under a reverse proxy's path prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import heap
from .metrics import Metrics


class Counting:
    """Counts responses by route (one of `routes`, else "other") and status for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")
        route = route if route in self.routes else "other"
        status = {"code": 500}

        async def send_counted(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(route, status["code"])


class GiveBackMemory:
    """Soon after a request with a large body is answered, the memory it freed goes back to the OS (heap.give_back
    on a thread, at most once per heap.DELAY_S)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.scheduled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.get("state", {}).get("big_body") and not self.scheduled:  # (set by body.read_body)
                self.scheduled = True
                asyncio.get_running_loop().call_later(heap.DELAY_S, self._give_back)

    def _give_back(self) -> None:
        self.scheduled = False
        asyncio.get_running_loop().run_in_executor(None, heap.give_back)


class RootPath:
    """The app is served under `root_path` too (behind a reverse proxy that keeps the prefix), as llama-cpp-python's
    server does with FastAPI's root_path."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)
