"""Serving throughput side by side with llama-server (built from the reference's llama.cpp source by
tools/oracle/build_server.sh) on the same GGUF: N concurrent streaming /v1/completions requests, N = 1, 2, 4, 8.

Each server is started for each N with N slots (`--parallel N`: one slot per stream, as llama-server is run for
N concurrent users; llama-server also with `-cb`, its default), the same total context `-c` and `-t` threads, on
127.0.0.1; N concurrent warm-up requests (other prompts of the same length, 8 tokens) go first, then the N
measured streams are sent at the same instant (a barrier; connections opened before it): fixed prompts of about
64 tokens, different per stream, `max_tokens` tokens each, temperature 0, `ignore_eos` (llama-server honours it;
ours ignores it, and random weights almost never choose EOS: streams that ended early are counted and printed).
Per N and engine:
  agg tok/s   aggregate decode throughput: the tokens after each stream's first token, summed over the streams, over
              the decode phase (from the first stream's first token to the last stream's last token)
  ttft        time to first token under load, from the send to the first chunk: median and max over the streams
  xN/1        the aggregate relative to one stream's (>= 1.5 at 4 streams is issue 16's target)
The engines alternate (the order flips every round), R rounds, medians; ratios are ours relative to llama-server,
> 1 is better for us (faster throughput, or shorter time to first token).

    python bench/serve.py --llama-server "$(tools/oracle/build_server.sh | tail -n1)" [--model medium|tiny|PATH]
        [--threads 2] [--streams 1,2,4,8] [--rounds 3] [--ctx 2048] [--max-tokens 64]
    python bench/serve.py --quick          # a smoke test: tiny model, 1 and 2 streams, 8 tokens, ours only

On a CPU with AMX, llama-server gets `--no-repack` (tools/oracle/README.md: this llama.cpp aborts on quantized
deepseek4 files with AMX-repacked weights). Models as bench/speed.py's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import bandwidth, bytes_per_token, model  # bench/ is not a package: beside this script

# prompt words: common English words, each about one token with a leading space
_TEXT = (
    "the of and to in is was for on that with as by at from his her an were which this be are had not or have "
    "but one their they all been has its more who there some would when time other into only new after first "
    "over two also may years most city made world small house water light river music family school number "
    "state early large under during between later name great second found part three long known place life"
)
WORDS = _TEXT.split()


@dataclass
class Stream:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried a choice
    tokens: int = 0  # completion tokens: the usage chunk's count, else the number of chunks
    prompt_tokens: int = 0
    finish_reason: str | None = None


def sse_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any] | None]:
    """The JSON objects of an SSE body, one per `data:` line, as the lines arrive; None for `data: [DONE]` (the end).
    Blank lines, comments (`:`) and other fields are skipped."""
    for raw in lines:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


def record(sent: float, events: Iterable[dict[str, Any] | None], clock: Any = time.perf_counter) -> Stream:
    """A Stream from the events of one completion, each timed by `clock` when it arrives."""
    s = Stream(sent)
    usage = None
    for ev in events:
        if ev is None:
            break
        if "error" in ev:
            raise RuntimeError(f"the server answered an error in the stream: {ev['error']}")
        if ev.get("choices"):
            s.chunks.append(clock())
            s.finish_reason = ev["choices"][0].get("finish_reason") or s.finish_reason
        if ev.get("usage"):
            usage = ev["usage"]
    if usage is not None:
        s.tokens, s.prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
    else:
        s.tokens = len(s.chunks)
    return s


def aggregate(streams: list[Stream], want: int) -> dict[str, float]:
    """agg (decode tokens/s over the decode phase), ttft_med, ttft_max (s), short (streams that produced fewer
    than the `want` tokens asked for: EOS), prompt (median prompt tokens)."""
    live = [s for s in streams if s.chunks]
    if len(live) != len(streams):
        raise RuntimeError(f"{len(streams) - len(live)} of {len(streams)} streams returned no token")
    ttft = sorted(s.chunks[0] - s.sent for s in live)
    start = min(s.chunks[0] for s in live)
    end = max(s.chunks[-1] for s in live)
    decoded = sum(max(s.tokens - 1, 0) for s in live)
    return {
        "agg": decoded / (end - start) if end > start else 0.0,
        "ttft_med": statistics.median(ttft),
        "ttft_max": ttft[-1],
        "short": float(sum(s.tokens < want for s in live)),
        "prompt": statistics.median(s.prompt_tokens for s in live),
    }


def prompt(i: int, words: int) -> str:
    """The fixed prompt of stream i: `words` words from a generator seeded by i (different per stream)."""
    rng = random.Random(i)
    return f"Story {i}:" + "".join(" " + rng.choice(WORDS) for _ in range(words))


def complete(port: int, body: dict[str, Any], barrier: threading.Barrier | None, timeout: float) -> Stream:
    """One streaming /v1/completions request; the connection is opened before the barrier, the request sent after."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.connect()
        if barrier is not None:
            barrier.wait()
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        return record(sent, sse_events(resp))
    finally:
        conn.close()


def fire(port: int, bodies: list[dict[str, Any]], timeout: float = 600) -> list[Stream]:
    """The requests at once, one thread each; their Streams in order (an exception in any is raised)."""
    out: list[Stream | BaseException | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> None:
        try:
            out[i] = complete(port, bodies[i], barrier, timeout)
        except BaseException as e:  # handed to the caller
            out[i] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return [r for r in out if isinstance(r, Stream)]


def body(text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx" in line for line in f)
    except OSError:
        return False


def command(engine: str, binary: str | None, path: str, n: int, ctx: int, threads: int, port: int) -> list[str]:
    """The server's command line: the same model, total context, slots and threads for both."""
    common = ["-m", path, "-c", str(ctx), "-np", str(n), "-t", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    if engine == "ours":
        return [sys.executable, "-m", "llama_dsv4.server", *common]
    assert binary is not None
    return [binary, *common, "-cb", *(["--no-repack"] if has_amx() else [])]


class Running:
    """A server process on 127.0.0.1 (its output in a log file), ready when /health answers 200."""

    def __init__(self, cmd: list[str], port: int, log: str) -> None:
        self.port, self.log = port, log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(log) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{cmd[0]} did not start (exit {self.proc.returncode}):\n{tail}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def measure(engine: str, a: argparse.Namespace, path: str, n: int, logdir: str) -> dict[str, float]:
    """Start the engine's server with n slots, warm every slot up, fire the n measured streams; their aggregate."""
    port = free_port()
    srv = Running(command(engine, a.llama_server, path, n, a.ctx, a.threads, port), port, f"{logdir}/{engine}-{n}.log")
    try:
        fire(port, [body(prompt(1000 + i, a.prompt_words), 8) for i in range(n)])  # the shapes measured
        return aggregate(fire(port, [body(prompt(i, a.prompt_words), a.max_tokens) for i in range(n)]), a.max_tokens)
    finally:
        srv.stop()


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def table(res: dict[str, dict[int, list[dict[str, float]]]], streams: list[int]) -> list[str]:
    """The markdown table of medians over rounds, with ratios ours / llama-server (> 1 better for us)."""
    ref = "llama-server" in res
    med = {
        e: {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in by.items()} for e, by in res.items()
    }
    head = ["streams", "ours agg tok/s", "ours xN/1", "ours ttft med / max s"]
    if ref:
        head += [
            "llama-server agg tok/s",
            "llama-server xN/1",
            "llama-server ttft med / max s",
            "agg ratio",
            "ttft ratio",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in streams:
        row = [str(n)]
        for e in ["ours"] + (["llama-server"] if ref else []):
            m, one = med[e][n], med[e][streams[0]]
            short = f" ({m['short']:.0f} short)" if m["short"] else ""
            row += [
                f"{m['agg']:.1f}{short}",
                f"{m['agg'] / one['agg']:.2f}x",
                f"{m['ttft_med']:.2f} / {m['ttft_max']:.2f}",
            ]
        if ref:
            o, r = med["ours"][n], med["llama-server"][n]
            row += [f"**{o['agg'] / r['agg']:.2f}x**", f"{r['ttft_med'] / o['ttft_med']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", help="llama-server binary (tools/oracle/build_server.sh); omitted: ours only")
    ap.add_argument("--model", help="medium (default), tiny, or a GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", help="default 1,2,4,8")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--ctx", type=int, default=2048, help="total context (-c), shared by the slots")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--prompt-words", type=int)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 and 2 streams, 8 tokens, 1 round")
    a = ap.parse_args(argv)
    quick = {"model": "tiny", "streams": "1,2", "rounds": 1, "max_tokens": 8, "prompt_words": 16}
    full = {"model": "medium", "streams": "1,2,4,8", "rounds": 3, "max_tokens": 64, "prompt_words": 60}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    streams = [int(x) for x in a.streams.split(",") if x]
    if not streams or min(streams) < 1 or a.rounds < 1:
        sys.exit("--streams needs positive counts and --rounds at least 1")
    if a.llama_server and not os.access(a.llama_server, os.X_OK):
        sys.exit(f"--llama-server {a.llama_server}: not an executable")
    path = model(a.model)
    engines = ["ours"] + (["llama-server"] if a.llama_server else [])
    res: dict[str, dict[int, list[dict[str, float]]]] = {e: {n: [] for n in streams} for e in engines}
    load0, t0 = uptime(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as logdir:
        for r in range(a.rounds):
            for n in streams:
                for e in engines if r % 2 == 0 else engines[::-1]:
                    res[e][n].append(measure(e, a, path, n, logdir))
    prompt_tokens = statistics.median(x["prompt"] for by in res.values() for rs in by.values() for x in rs)
    size = os.path.getsize(path)
    print(
        f"{os.path.basename(path)} ({size / 2**20:.0f} MiB), {a.threads} threads, -c {a.ctx}, -np = streams, "
        f"prompts of {prompt_tokens:.0f} tokens, {a.max_tokens} tokens per stream, {a.rounds} rounds, medians; "
        f"{os.cpu_count()} CPUs, load average {load0} before, {uptime()} after, {time.monotonic() - t0:.0f} s"
    )
    print("\n".join(table(res, streams)))
    if not a.quick:
        bpt, bw = bytes_per_token(path), bandwidth()
        print(
            f"one stream's decode ceiling: {bpt / 2**20:.1f} MiB of weights per token / {bw / 1e9:.1f} GB/s "
            f"(numpy copy, 1 thread) = {bw / bpt:.0f} tokens/s"
        )
    print(
        "agg: decode tokens after each stream's first / the decode phase; xN/1: relative to the first row; "
        "ratios: ours relative to llama-server, > 1 is better for us; short: streams that ended before max_tokens"
    )


if __name__ == "__main__":
    main()
