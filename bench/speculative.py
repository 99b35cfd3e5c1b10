"""Speculative decoding with the MTP layer (docs/speculative.md): decode speed with and without it, ours and
llama.cpp's, on the same GGUF.

    python bench/speculative.py [--model demo|medium|PATH] [--n 1,2,3] [--tokens 96] [--threads 2] [--rounds 3]
        [--llama-server "$(tools/oracle/build_server.sh | tail -n1)"] [--ceiling] [--fresh-mtp-graph]
        [--llama-speculative "$(tools/oracle/build_server.sh llama-speculative-simple | tail -n1)"]

Our engine, in this process (greedy, the chat prompts below rendered with the file's template, `--tokens` tokens
each): decode tokens/s without speculation and with `spec_type="mtp", spec_draft_n_max=N`, the acceptance rate
per draft position, and the cost of verifying N+1 tokens in one evaluation relative to one decode step (same
depth). `--ceiling`: also the speed when every draft is right (drafts taken from a plain greedy run, through
llama-cpp-python's draft_model protocol): the limit for a model whose MTP head always agrees. `--fresh-mtp-graph`:
the MTP block's graph built afresh for every draft instead of held (what the held graph saves). With
`--llama-server`: both servers (ours `llama-dsv4-server`, llama.cpp's built from the reference's source), one
stream, the same prompt tokens to /v1/completions, plain and `--spec-type draft-mtp --spec-draft-n-max N`: decode
tokens/s (from the first streamed token to the last) and the accepted share from each server's /metrics; the
ratio ours / llama.cpp (> 1: ours faster). Rounds alternate the engines; medians. With `--llama-speculative`:
llama.cpp's own in-process driver (llama-speculative-simple, built from the reference's source) on the same
prompt texts, draft-mtp at each N, run in the same rounds as ours; its decode tokens/s beside ours in process.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve

from llama_dsv4 import Llama
from llama_dsv4.demo import demo_model_path

PROMPTS = (
    "What is 374 + 783?",
    "What is 682 - 419?",
    "What is 905 + 96?",
    'Return JSON with the key "numbers" holding the numbers from 3 to 7.',
    "Give me a JSON object for a person named Olga who is 41 years old and lives in Dublin.",
)


def model_path(name: str) -> str:
    """demo: the shipped demo model; medium: bench/speed.py's medium model with an MTP layer (random weights,
    written once to ~/.cache/llama-dsv4/bench); else a path."""
    if name == "demo":
        return demo_model_path()
    if name == "medium":
        import speed  # bench/speed.py's medium model

        from llama_dsv4.model.params import DSV4Params
        from llama_dsv4.model.writer import write_model

        path = os.path.join(os.path.expanduser("~"), ".cache", "llama-dsv4", "bench", "spec-medium-mtp-q8xq5.gguf")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cr = speed.MEDIUM["compress_ratios"]
            p = DSV4Params(**{**speed.MEDIUM, "n_nextn": 1, "compress_ratios": (*cr, 0)})
            write_model(path + ".part", p, dtype="q8xq5", vocab="real", name="speculative bench medium + MTP")
            os.replace(path + ".part", path)
        return path
    return name


def prompt_texts(llm: Llama) -> list[str] | None:
    """The prompts rendered with the file's chat template (BOS text included), or None without a template."""
    from llama_dsv4.chat.template import render

    tmpl = llm.metadata.get("tokenizer.chat_template")
    if not tmpl:
        return None
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    return [render(tmpl, messages=[{"role": "user", "content": q}], add_generation_prompt=True, bos_token=bos)
            for q in PROMPTS]  # fmt: skip


def prompt_tokens(llm: Llama) -> list[list[int]]:
    texts = prompt_texts(llm)
    if texts is None:
        return [llm.tokenize(q.encode()) for q in PROMPTS]
    return [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]


def decode_rate(llm: Llama, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]], list[float]]:
    """Greedy decode tokens/s over the prompts (from the first generated token to the n-th), the tokens, and the
    milliseconds per token the engine spent building and allocating graphs, filling their inputs and computing
    them (Context.t_graph, t_inputs, t_compute) and in the rest (sampling, drafting's and the sequence's Python)."""
    ctx = llm._runner.context  # the engine context (bench only)
    tokens, seconds, outs, split = 0, 0.0, [], [0.0, 0.0, 0.0]
    for p in prompts:
        out: list[int] = []
        t0 = 0.0
        for tok in llm.generate(p, temp=0.0, reset=True):
            if not out:
                t0 = time.perf_counter()
                before = (ctx.t_graph, ctx.t_inputs, ctx.t_compute)
            out.append(tok)
            if len(out) == n:
                break
        seconds += time.perf_counter() - t0
        for i, (b, e) in enumerate(zip(before, (ctx.t_graph, ctx.t_inputs, ctx.t_compute), strict=True)):
            split[i] += e - b
        tokens += len(out) - 1
        outs.append(out)
    ms = [1e3 * x / tokens for x in split]
    return tokens / seconds, outs, [*ms, 1e3 * seconds / tokens - sum(ms)]


def verify_cost(llm: Llama, prompt: list[int], n_max: int, reps: int = 20) -> float:
    """Seconds of one evaluation of n_max + 1 tokens over one of 1 token, at the prompt's depth."""
    ctx = llm._runner.context  # the engine context (bench only)
    times = {}
    for k in (1, n_max + 1):
        ts = []
        for _ in range(reps):
            ctx.reset()
            ctx.eval(np.asarray(prompt, np.int64))
            t = time.perf_counter()
            ctx.eval(np.asarray(prompt[:k], np.int64))
            ts.append(time.perf_counter() - t)
        times[k] = statistics.median(ts)
    return times[n_max + 1] / times[1]


class Replay:
    """llama-cpp-python's draft-model protocol answering with the next tokens of a reference run: every draft
    right (the ceiling of speculation)."""

    def __init__(self, prompts: list[list[int]], outs: list[list[int]], n: int) -> None:
        self.seqs = [p + o for p, o in zip(prompts, outs, strict=True)]
        self.n = n

    def __call__(self, ids: Any) -> np.ndarray:
        ids = list(ids)
        for s in self.seqs:
            if s[: len(ids)] == ids:
                return np.array(s[len(ids) : len(ids) + self.n], np.intc)
        return np.zeros(0, np.intc)


def llama_cpp_spec(a: argparse.Namespace, path: str, texts: list[str], n: int) -> tuple[float, float, int]:
    """llama.cpp's own speculative driver (llama-speculative-simple, in its process) on each prompt text: greedy,
    `--tokens` tokens, --spec-type draft-mtp --spec-draft-n-max n, the end token banned (ours decodes past it too).
    Returns (decode tokens/s over all prompts, accepted / drafted, prompt tokens of the first prompt as it read
    them)."""
    tokens, seconds, drafted, accepted, n_first = 0, 0.0, 0, 0, -1
    for text in texts:
        cmd = [a.llama_speculative, "-m", path, "-p", text, "-n", str(a.tokens), "--temp", "0", "--ignore-eos",
               "-t", str(a.threads), "-tb", str(a.threads), "-c", "2048", "--spec-type", "draft-mtp",
               "--spec-draft-n-max", str(n), *(["--no-repack"] if serve.has_amx() else [])]  # fmt: skip
        for attempt in range(3):  # its log thread now and then loses the last lines (the figures) at exit
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
            out = r.stdout + r.stderr
            got = {k: re.search(pat, out) for k, pat in (
                ("enc", r"encoded\s+(\d+) tokens"), ("dec", r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
                ("drafted", r"n_drafted\s*=\s*(\d+)"), ("accept", r"n_accept\s*=\s*(\d+)"))}  # fmt: skip
            if r.returncode == 0 and all(got.values()):
                break
            if r.returncode != 0 or attempt == 2:
                raise RuntimeError(f"{a.llama_speculative} failed (exit {r.returncode}):\n{out[-3000:]}")
        if n_first < 0:
            n_first = int(got["enc"].group(1))
        tokens += int(got["dec"].group(1))
        seconds += float(got["dec"].group(2))
        drafted += int(got["drafted"].group(1))
        accepted += int(got["accept"].group(1))
    return tokens / seconds, accepted / max(1, drafted), n_first


def engine_table(a: argparse.Namespace, path: str) -> None:
    ns = [int(x) for x in a.n.split(",")]
    kw = dict(model_path=path, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    plain = Llama(**kw)
    prompts = prompt_tokens(plain)
    rates: dict[str, list[float]] = {}
    splits: dict[str, list[list[float]]] = {}
    ref: list[list[int]] = []
    stats: dict[int, dict[str, Any]] = {}
    same: dict[int, int] = {}
    texts = prompt_texts(plain) if a.llama_speculative else None
    if a.llama_speculative and texts is None:
        raise SystemExit("--llama-speculative needs a file with a chat template (the prompts are sent as text)")
    theirs: dict[int, list[tuple[float, float, int]]] = {}
    spec = {n: Llama(**kw, spec_type="mtp", spec_draft_n_max=n) for n in ns}
    for llm in spec.values():
        llm._runner.context.hold_mtp_graph = not a.fresh_mtp_graph  # (bench only)
    for _ in range(a.rounds):
        r, ref, sp = decode_rate(plain, prompts, a.tokens)
        rates.setdefault("plain", []).append(r)
        splits.setdefault("plain", []).append(sp)
        for n, llm in spec.items():
            r, outs, sp = decode_rate(llm, prompts, a.tokens)
            same[n] = sum(o == f for o, f in zip(outs, ref, strict=True))  # (a near-tie may part them: see docs)
            rates.setdefault(f"mtp {n}", []).append(r)
            splits.setdefault(f"mtp {n}", []).append(sp)
            stats[n] = llm.spec_stats() or {}
        for n in ns if texts else ():  # llama.cpp's in-process driver, in the same rounds
            theirs.setdefault(n, []).append(llama_cpp_spec(a, path, texts, n))
        if a.ceiling:
            for n in ns:
                with Llama(**kw, draft_model=Replay(prompts, ref, n)) as llm:
                    r, outs, sp = decode_rate(llm, prompts, a.tokens)
                    rates.setdefault(f"all drafts right {n}", []).append(r)
                    splits.setdefault(f"all drafts right {n}", []).append(sp)
    base = statistics.median(rates["plain"])
    print(f"our engine, {os.path.basename(path)}, {a.threads} threads, greedy, {len(prompts)} prompts x {a.tokens} "
          f"tokens, {a.rounds} rounds (medians); {time.strftime('%Y-%m-%d')}; a plain decode step's graph has "
          f"{plain._runner.context.last_graph_nodes} nodes")  # fmt: skip
    print("| decoding | tokens/s | x plain | accepted / drafted | accepted by draft position | verify N+1 / 1 step "
          "| evaluated again per step | ms/token: graphs / inputs / compute / rest |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in rates.items():
        med = statistics.median(rs)
        split = " / ".join(f"{statistics.median(x[i] for x in splits[name]):.3f}" for i in range(4))
        acc = pos = cost = again = ""
        if name.startswith("mtp"):
            n = int(name.split()[1])
            st = stats[n]
            acc = f"{st['accepted'] / max(1, st['drafted']):.2f}"
            pos = ", ".join(f"{x / max(1, st['steps']):.2f}" for x in st["accepted_at"])
            cost = f"{verify_cost(plain, prompts[0], n):.2f}"
            again = f"{st['reevaluated'] / max(1, st['steps']):.2f}"
            name += f" ({same[n]}/{len(prompts)} texts = plain)"
        print(f"| {name} | {med:.1f} | {med / base:.2f} | {acc} | {pos} | {cost} | {again} | {split} |")
    if theirs:
        print(f"\nllama.cpp's {os.path.basename(a.llama_speculative)} (the same file, prompts and threads, in its "
              f"own process; it read {theirs[ns[0]][0][2]} tokens of the first prompt, ours {len(prompts[0])}), "
              f"medians of {a.rounds} rounds run between ours:")  # fmt: skip
        print("| draft-mtp | ours in process, tok/s | llama.cpp in process, tok/s | ours / llama.cpp | "
              "accepted / drafted: ours / llama.cpp |")  # fmt: skip
        print("|---|---|---|---|---|")
        for n in ns:
            o = statistics.median(rates[f"mtp {n}"])
            t = statistics.median(x[0] for x in theirs[n])
            acc = f"{stats[n]['accepted'] / max(1, stats[n]['drafted']):.2f} / {theirs[n][-1][1]:.2f}"
            print(f"| N = {n} | {o:.1f} | {t:.1f} | **{o / t:.2f}** | {acc} |")
    for llm in spec.values():
        llm.close()
    plain.close()


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        for prefix in ("llamacpp:", "llamadsv4:"):  # llama-server's and ours
            if line.startswith(f"{prefix}{name} "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def server_rate(engine: str, a: argparse.Namespace, path: str, prompts: list[list[int]], n: int, log: str) -> tuple:
    port = serve.free_port()
    cmd = serve.command(engine, a.llama_server, path, 1, 2048, a.threads, port)
    if engine != "ours":
        cmd += ["--metrics"]
    if n:
        cmd += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(n)]
    srv = serve.Running(cmd, port, log)
    try:
        bodies = [{"prompt": p, "max_tokens": a.tokens, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True}} for p in prompts]  # fmt: skip
        serve.fire(port, bodies[:1])  # warm-up
        tokens, seconds = 0, 0.0
        for b in bodies:
            (st,) = serve.fire(port, [b])
            tokens += max(0, st.tokens - 1)
            seconds += st.chunks[-1] - st.chunks[0] if st.chunks else 0.0
        names = ("spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total")
        drafted, accepted = (metric(port, k) for k in names)
        return tokens / seconds if seconds > 0 else 0.0, accepted / drafted if drafted else float("nan")
    finally:
        srv.stop()


def server_table(a: argparse.Namespace, path: str) -> None:
    ns = [0] + [int(x) for x in a.n.split(",")]
    with Llama(model_path=path, n_ctx=2048, verbose=False, vocab_only=True) as v:
        prompts = prompt_tokens(v)
    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as logs:
        for r in range(a.rounds):
            for engine in ("ours", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "ours"):
                for n in ns:
                    log = os.path.join(logs, f"{engine}-{n}.log")
                    res.setdefault((engine, n), []).append(server_rate(engine, a, path, prompts, n, log))
    print(f"servers, one stream, {os.path.basename(path)}, {a.threads} threads, {len(prompts)} prompts x {a.tokens} "
          f"tokens, {a.rounds} rounds (medians); {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| decoding | ours tok/s | llama.cpp tok/s | ours / llama.cpp | accepted share ours / llama.cpp |")
    print("|---|---|---|---|---|")
    for n in ns:
        o = statistics.median(x[0] for x in res[("ours", n)])
        t = statistics.median(x[0] for x in res[("llama.cpp", n)])
        acc = "" if n == 0 else f"{res[('ours', n)][-1][1]:.2f} / {res[('llama.cpp', n)][-1][1]:.2f}"
        print(f"| {'plain' if n == 0 else f'draft-mtp {n}'} | {o:.1f} | {t:.1f} | {o / t:.2f} | {acc} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", default="1,2,3", help="draft lengths")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ceiling", action="store_true", help="also the speed with every draft right")
    ap.add_argument(
        "--fresh-mtp-graph",
        action="store_true",
        help="build the MTP block's graph afresh for every draft (the held graph's gain, by comparison)",
    )
    ap.add_argument("--llama-server", help="llama.cpp's llama-server (tools/oracle/build_server.sh)")
    ap.add_argument(
        "--llama-speculative",
        help="llama.cpp's llama-speculative-simple (tools/oracle/build_server.sh llama-speculative-simple)",
    )
    a = ap.parse_args()
    path = model_path(a.model)
    engine_table(a, path)
    if a.llama_server:
        server_table(a, path)


if __name__ == "__main__":
    main()
