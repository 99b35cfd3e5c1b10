"""The child process of engine/isolated.py: it builds the context of a split across RPC servers and answers the
parent's requests (attribute reads, writes, method calls) over the socket pair whose descriptor is its argument.
A failure of ggml's RPC client ends this process, which the parent reports as RPCError."""

from __future__ import annotations

import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from .. import _ggml
from ..model.loader import load_model
from . import runtime
from .isolated import METHOD, ChildSpec


def main() -> None:  # pragma: no cover (the child process)
    """The entry: the socket's descriptor is the one argument, the ChildSpec the first message."""
    conn = Connection(int(sys.argv[1]))
    _child(conn, conn.recv())


def _child(conn: Any, spec: ChildSpec) -> None:  # pragma: no cover (runs in the child process)
    """The child's loop: build the context, then answer requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        model = load_model(spec.path, use_mmap=spec.use_mmap)
        if spec.kwargs.get("rpc_servers"):
            _ggml.rpc_connect(spec.kwargs["rpc_servers"])  # bounded by the call timeout; loading by load_timeout
            conn.send(("progress", "connected"))
        ctx = runtime.build_context(model, **spec.kwargs)
        conn.send(("ok", {"n_seq": int(ctx.n_seq), "n_ubatch": int(ctx.n_ubatch), "layer_dev": ctx.layer_dev}))
    except BaseException as e:
        _send_error(conn, e)
        return
    while True:
        try:
            op, name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            if op == "get":
                value = getattr(ctx, name)
                result = METHOD if callable(value) else value
            elif op == "set":
                setattr(ctx, name, args)
                result = None
            else:
                result = getattr(ctx, name)(*args, **kwargs)
            conn.send(("ok", result))
        except BaseException as e:
            _send_error(conn, e)


def _send_error(conn: Any, e: BaseException) -> None:  # pragma: no cover (child)
    try:
        conn.send(("err", e))
    except Exception:
        conn.send(("err", RuntimeError(f"{type(e).__name__}: {e}")))
