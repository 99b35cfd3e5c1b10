"""`llama-dsv4-rpc-server`: this machine's CPU (or another ggml device) as an RPC device for a model split across
machines (`Llama(rpc_servers=...)`, `--rpc`), with ggml's own RPC server, as llama.cpp's rpc-server:

    llama-dsv4-rpc-server -p 50052 -t 8 -c ~/.cache/llama-dsv4/rpc     # listens on 127.0.0.1:50052

The protocol has no authentication and no encryption: anyone who reaches the port can run graphs and read and
write the server's memory. It listens on 127.0.0.1 unless --host says otherwise; reach it from another machine
through an SSH tunnel (`ssh -N -L 50052:127.0.0.1:50052 host`) or over a private network (README, "Beyond one
machine").

ggml's server aborts its process on a malformed request, so this command supervises it: the server runs in a child
process that is started again (after a short pause that grows while it keeps failing) when it ends, and the
command exits only on Ctrl-C or SIGTERM. ggml's server takes one client at a time.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time

from . import _ggml

WARNING = (
    "warning: the RPC protocol has no authentication or encryption: whoever reaches {endpoint} can run computations "
    "and read and write this server's memory. Use it on a private network or through an SSH tunnel."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama-dsv4-rpc-server",
        description="Serve this machine's device to llama-dsv4 clients over ggml's RPC protocol (no authentication).",
    )
    p.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: the usable CPUs)")
    p.add_argument("-d", "--device", default="cpu", help="ggml device to serve (default cpu)")
    p.add_argument(
        "-c",
        "--cache",
        metavar="DIR",
        default=None,
        help="cache large tensors in DIR, so a client that connects again sends only their hashes",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the supervised child
    return p


def _check(args: argparse.Namespace) -> str:
    """The endpoint, after checking the flags; SystemExit(2) with the reason otherwise."""
    if not 0 < args.port < 65536:
        raise SystemExit(f"llama-dsv4-rpc-server: --port must be in 1-65535, got {args.port}")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise SystemExit(f"llama-dsv4-rpc-server: --host must be an IP address, got {args.host!r}") from None
    if args.threads < 0:
        raise SystemExit(f"llama-dsv4-rpc-server: --threads must be >= 0, got {args.threads}")
    if not _ggml.rpc_available():
        raise SystemExit(
            "llama-dsv4-rpc-server: this libggml has no RPC backend (the PyPI wheel of libggml-python is built "
            f"without it); install the RPC-enabled build:\n  {_ggml.RPC_INSTALL}"
        )
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
    return f"{args.host}:{args.port}"


def _worker(args: argparse.Namespace, endpoint: str) -> int:
    from .engine.cpus import usable_cpus

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # ggml's accept loop never returns to Python: die on Ctrl-C
    parent = os.getppid()

    def watch_parent() -> None:  # the supervisor ended (even by SIGKILL): so does the server
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    threads = args.threads or usable_cpus()
    _ggml.rpc_serve(endpoint, args.cache, threads, args.device)
    return 1  # the server returns only when it could not start (the port taken) or accept


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    endpoint = _check(args)
    if args.worker:
        return _worker(args, endpoint)
    print(WARNING.format(endpoint=endpoint), file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "::1"):
        print(f"note: listening on {args.host}, not only this machine", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "llama_dsv4.rpc_server", "--worker", *(argv if argv is not None else sys.argv[1:])]
    stop = False
    child: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pause = 0.5
    while not stop:
        started = time.monotonic()
        child = subprocess.Popen(cmd, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        code = child.wait()
        if stop:
            break
        if time.monotonic() - started > 30:
            pause = 0.5  # it ran a while: a client's bad request, not a failure to start
        print(
            f"llama-dsv4-rpc-server: the server ended (status {code}); starting it again in {pause:g} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(pause)
        pause = min(pause * 2, 30.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
