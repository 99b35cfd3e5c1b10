"""Speed of a model split across RPC servers (README, "Beyond one machine"): prefill and decode tokens/s for the
local run, a 2-way split (one llama-dsv4-rpc-server and this process) and a 3-way split (two servers), over
loopback and over a link shaped as 1 Gbit/s with 0.5 ms latency each way, and the bytes that cross the links per
decoded token.

    python bench/rpc.py [--model medium|PATH] [--threads 2] [--prefill 128] [--decode 32] [--rounds 3]

Prefill: the median of three timed passes after a warm-up pass; decode: the tokens after the last pass, one call
each (through Llama, so the split's child process and its pipe are in the figures).

Needs the RPC-enabled install. Every server runs on this machine (the computation of a split is sequential: ggml's
RPC is synchronous, one device computes at a time, so each gets the threads). The shaped link is a relay process of
this script (tc netem needs a kernel module this machine lacks): each chunk is delivered 0.5 ms after it was read
and no sooner than the link's 1 Gbit/s allows after the one before. Bytes per token: what the servers' connections
sent and received during decode (the kernel's counters, `ss -ti`), divided by the tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


# ------------------------------------------------------------------------------------------------ the shaped link


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float, bps: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    free_at = 0.0

    async def deliver() -> None:
        while True:
            at, data = await queue.get()
            if not data:
                writer.close()
                return
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    while True:
        data = await reader.read(1 << 16)
        now = time.monotonic()
        start = max(now, free_at)
        free_at = start + len(data) * 8 / bps
        await queue.put((free_at + latency, data))
        if not data:
            break
    await task


def relay(listen: int, target: int, latency: float, bps: float) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection("127.0.0.1", target)
        for s in (w, tw):
            s.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(r, tw, latency, bps), _pipe(tr, w, latency, bps), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ servers


class Server:
    def __init__(self, threads: int, shaped: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_dsv4.rpc_server", "-p", str(self.port), "-t", str(threads)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        self.relay = None
        self.endpoint = f"127.0.0.1:{self.port}"
        if shaped:
            rport = free_port()
            self.relay = subprocess.Popen(
                [sys.executable, __file__, "--relay", str(rport), str(self.port)], stdout=subprocess.DEVNULL
            )
            wait_port(rport)
            self.endpoint = f"127.0.0.1:{rport}"

    def io_bytes(self) -> int:
        """Bytes the server's connections have sent and received (the kernel's counters, `ss -ti`)."""
        out = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( sport = :{self.port} )"], capture_output=True, text=True
        ).stdout
        return sum(int(m) for m in re.findall(r"bytes_(?:sent|received):(\d+)", out))

    def stop(self) -> None:
        for p in (self.relay, self.proc):
            if p is not None:
                p.terminate()
                p.wait(20)


def measure(path: str, n_servers: int, shaped: bool, portable: bool, args: argparse.Namespace) -> dict[str, float]:
    from llama_dsv4 import Llama

    servers = [Server(args.threads, shaped) for _ in range(n_servers)]
    if portable:
        os.environ["LLAMA_DSV4_GEMM"] = "portable"  # the local run with the graph a split computes
    try:
        kw = {}
        if servers:
            kw = {"rpc_servers": ",".join(s.endpoint for s in servers), "tensor_split": [1.0] * (n_servers + 1)}
        t0 = time.monotonic()
        llm = Llama(path, n_ctx=1024, n_batch=512, n_threads=args.threads, verbose=False, **kw)
        load = time.monotonic() - t0
        rng = np.random.default_rng(0)
        toks = [int(t) for t in rng.integers(10, llm.n_vocab() - 10, args.prefill + args.decode)]
        times = []
        for _ in range(4):  # the first pass warms the pages of the mapped file: the median of the other three
            llm.reset()
            t0 = time.monotonic()
            llm.eval(toks[: args.prefill])
            times.append(time.monotonic() - t0)
        pp = args.prefill / float(np.median(times[1:]))
        before = sum(s.io_bytes() for s in servers)
        t0 = time.monotonic()
        for t in toks[args.prefill :]:
            llm.eval([t])
        tg = args.decode / (time.monotonic() - t0)
        per_token = (sum(s.io_bytes() for s in servers) - before) / args.decode
        llm.close()
        return {"load_s": load, "pp": pp, "tg": tg, "bytes_per_token": per_token}
    finally:
        os.environ.pop("LLAMA_DSV4_GEMM", None)
        for s in servers:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        relay(args.relay[0], args.relay[1], latency=0.5e-3, bps=1e9)
        return
    from speed import model

    from llama_dsv4 import _ggml

    if not _ggml.rpc_available():
        raise SystemExit(f"needs the RPC-enabled install: {_ggml.RPC_INSTALL}")
    path = model(args.model)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.path.basename(path)} "
        f"({os.path.getsize(path) / 2**30:.2f} GiB), {args.threads} threads, pp{args.prefill}, tg{args.decode}"
    )
    configs = [  # (servers, shaped link, portable graph, split, link)
        (0, False, False, "local (our kernels)", "-"),
        (0, False, True, "local (ggml's ops)", "-"),
        (1, False, True, "2-way", "loopback"),
        (2, False, True, "3-way", "loopback"),
        (1, True, True, "2-way", "1 Gbit/s, 0.5 ms"),
        (2, True, True, "3-way", "1 Gbit/s, 0.5 ms"),
    ]
    runs: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(configs))}
    for _ in range(args.rounds):  # interleaved: a slow spell of this machine spreads over every configuration
        for i, (n, shaped, portable, _, _) in enumerate(configs):
            runs[i].append(measure(path, n, shaped, portable, args))
    print(f"median of {args.rounds} rounds (min-max of decode tok/s)")
    print(
        "| split | link | load s | prefill tok/s | decode tok/s | bytes/token (decode) | decode vs local, ggml's ops |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    med = {i: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for i, rs in runs.items()}
    for i, (_, _, _, name, link) in enumerate(configs):
        r, tgs = med[i], [x["tg"] for x in runs[i]]
        tg = f"{r['tg']:.2f} ({min(tgs):.1f}-{max(tgs):.1f})"
        print(
            f"| {name} | {link} | {r['load_s']:.1f} | {r['pp']:.1f} | {tg} | "
            f"{r['bytes_per_token'] / 1024:.1f} KiB | {r['tg'] / med[1]['tg']:.2f}x |"
        )


if __name__ == "__main__":
    main()
