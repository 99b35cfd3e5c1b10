"""The HTTP/1.1 connection (uvicorn's h11 protocol) with the bounds a server facing strangers needs.

- `--header-timeout`: a connection must send a request's complete headers within this many seconds of connecting
  or of its previous answer, however slowly it dribbles them (slowloris); otherwise it is closed. uvicorn itself
  only times out idle keep-alive connections, and restarts that timer on every byte received.
- `--limit-concurrency`: a request on a connection opened while that many were already open is answered at once
  with an OpenAI-style 503 (and the connection closed) instead of reaching the model.
- `--send-buffer-kib`: the kernel's send buffer of each connection, so a client that stops reading a stream parks
  at most that much there (Linux otherwise grows it up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default); past
  it the stream's sends block, its generation pauses (slots.Job.AHEAD) and `--timeout` later drops it.
- h11 bounds the bytes of a request line and headers (16 KiB by default: a 431/400 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError
from .settings import Settings

BUSY = APIError(
    503,
    "the server has too many connections open (--limit-concurrency): try again later",
    "server_error",
    code="server_busy",
)


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """ASGI app answering a request on a connection over --limit-concurrency: 503, then the connection closes."""
    if scope["type"] != "http":
        return
    body = json.dumps(BUSY.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protocol_class(settings: Settings) -> type[H11Protocol]:
    """uvicorn's `http=` protocol for these settings."""
    header_timeout = settings.header_timeout
    limit = settings.limit_concurrency
    sndbuf = settings.send_buffer_kib * 1024

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sndbuf > 0 and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            if len(self.connections) > limit:
                self.app = _busy
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._handling():  # a whole request line and headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._handling():
                self._arm()  # the next request's headers are due in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _handling(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            if header_timeout > 0:
                self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self._handling() and not self.transport.is_closing():
                self.transport.close()

    return Protocol
