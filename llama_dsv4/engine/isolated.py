"""`IsolatedContext`: an engine context that lives in a child process, for a model split across RPC servers.

ggml's RPC client aborts its process when a server dies, answers garbage or closes the connection (every failed
exchange is an assertion in ggml-rpc.cpp), and it blocks without a timeout on a server that stops answering. So the
client half of a split (the local layers and the connections to the servers) runs in a child process, and this
process talks to it through a pipe: a failure of the split ends the child, never the caller, and reaches the
caller as `RPCError` within `timeout` seconds. The next call starts a new child, which connects again (the
sequences held are gone: each sequence evaluates its tokens again, sequence.py). docs/rpc.md has the data flow.

The proxy forwards attribute reads, writes and method calls of engine/context.pyx's Context; what crosses the pipe
is pickled (token arrays in, logits out: about 4 bytes per vocabulary entry of each logits row).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


class RPCError(ConnectionError):
    """The part of the model on RPC servers failed: a server could not be reached, died, answered garbage or did
    not answer in time. The context is discarded; the next call connects again."""


METHOD = "__method__"  # a get's answer for a callable attribute (engine/rpc_child.py)


@dataclass
class ChildSpec:
    """What the child needs to build the context: the model file and runtime.create_context's arguments."""

    path: str
    use_mmap: bool
    kwargs: dict[str, Any] = field(default_factory=dict)


class IsolatedContext:
    """A Context (engine/context.pyx) built and run in a child process (module docstring). Attribute reads, writes
    and method calls are forwarded; `backends` is None here (the child's thread count is fixed). timeout: seconds
    any one call may take before the child is ended and RPCError raised (connecting and loading the weights onto the
    servers: `load_timeout`)."""

    def __init__(self, spec: ChildSpec, timeout: float = 120.0, load_timeout: float = 600.0) -> None:
        if not timeout > 0 or not load_timeout > 0:
            raise ValueError(f"timeouts must be positive, got {timeout} and {load_timeout}")
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_timeout", float(timeout))
        object.__setattr__(self, "_load_timeout", float(load_timeout))
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "_proc", None)
        object.__setattr__(self, "_conn", None)
        object.__setattr__(self, "_methods", set())
        object.__setattr__(self, "_info", {})
        object.__setattr__(self, "restarts", -1)  # children started after the first
        self._start()

    # -------------------------------------------------------------------------------------------- the child

    def _start(self) -> None:
        # a new interpreter running this module (not multiprocessing's spawn, which imports the caller's __main__
        # again: scripts without a __main__ guard would run twice), talking over a socket pair
        ours, theirs = socket.socketpair()
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # a failed assertion must not attach gdb to the child
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from llama_dsv4.engine.rpc_child import main; main()",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(self._spec)
        object.__setattr__(self, "_proc", proc)
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "restarts", self.restarts + 1)
        info = self._answer(self._timeout, "connecting to the RPC servers")
        if info == "connected":
            info = self._answer(self._load_timeout, "loading the model onto the RPC servers")
        object.__setattr__(self, "_info", info)

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        object.__setattr__(self, "_proc", None)
        object.__setattr__(self, "_conn", None)
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)

    def _answer(self, timeout: float, what: str) -> Any:
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None
        try:
            ready = conn.poll(timeout)
            if not ready:
                self._stop()
                raise RPCError(
                    f"{what}: no answer from the model's RPC part within {timeout:g} s (a server that stopped "
                    "answering, a network partition, or a server busy with another client: ggml's RPC server "
                    "takes one client at a time)"
                )
            status, value = conn.recv()
            if status == "progress":
                return value
        except (EOFError, OSError, ConnectionError) as e:
            if isinstance(e, RPCError):
                raise
            try:
                code: int | None = proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self._stop()
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise RPCError(
                f"{what}: the RPC client process ended ({how}): a server died, closed the connection or answered "
                "something malformed (its message is above)"
            ) from None
        except BaseException:  # KeyboardInterrupt while waiting: the answer would come to the next request
            self._stop()
            raise
        if status == "err":
            if what.startswith(("connecting", "loading")):
                self._stop()
            raise value
        return value

    def _request(self, op: str, name: str, args: Any = (), kwargs: dict[str, Any] | None = None) -> Any:
        with self._lock:
            if self._proc is None:
                self._start()  # after a failure: connect again
            try:
                self._conn.send((op, name, args, kwargs or {}))
            except (OSError, ValueError):
                self._stop()
                raise RPCError(f"{name}: the RPC client process is gone") from None
            return self._answer(self._timeout, name)

    # -------------------------------------------------------------------------------------------- the proxy

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "backends":
            return None
        if name not in self._methods:
            value = self._request("get", name)
            if value != METHOD:
                return value
            self._methods.add(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._request("call", name, args, kwargs)

        call.__name__ = name
        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "route_sink" and value is not None:
            raise ValueError("expert residency needs the weights in this process's memory, not on RPC servers")
        self._request("set", name, value)

    @property
    def layer_dev(self) -> list[int] | None:
        return self._info.get("layer_dev")

    @property
    def n_seq(self) -> int:
        return int(self._info["n_seq"])

    @property
    def n_ubatch(self) -> int:
        return int(self._info["n_ubatch"])

    @property
    def pid(self) -> int | None:
        """The child's process id (None between a failure and the next call)."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """End the child (its connections to the servers close with it)."""
        with self._lock:
            if self._proc is not None and self._conn is not None:
                try:
                    self._conn.send(("close", "", (), {}))
                    self._conn.poll(5)
                except OSError:
                    pass
            self._stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop()
