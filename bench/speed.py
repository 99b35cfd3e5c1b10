"""Speed side by side with llama.cpp (llama-cpp-python 0.3.36, tools/oracle/) on the same GGUF, in one run.

Both engines run the same llama-cpp-python API code (ours as a drop-in), each in its own process, alternating,
R rounds; the table shows medians and ours/reference ratios:
  load      seconds to construct Llama (open, validate, map)
  pp64cold  the first eval after load (64 tokens), tokens/s: includes reading the weights it touches
  pp N      prompt processing: N tokens in one eval (n_batch 512), after an untimed 512-token warm-up, tokens/s;
            the median of 3 evals (llama-bench's -r: this shared machine's speed varies from eval to eval)
  ttft      time to first token: a 512-token prompt then one sampled token, seconds
  tg 128 @d decode: 128 single-token evals after a prefill of d tokens, tokens/s
  peak RSS  of the process at the end, MiB
For ours also: share of decode wall time outside ggml's graph compute and graph build (Python and glue).
The decode ceiling is the bytes of weights a token reads (attention, shared expert, router, head, and
n_expert_used of the routed experts per layer) over this machine's memory bandwidth (numpy copy of 512 MiB).

    python bench/speed.py --oracle-python $(tools/oracle/setup.sh) [--model tiny|medium|PATH] [--threads 2]
        [--depths 0,1024,8192] [--rounds 3] [--baseline-python PATH]

--baseline-python runs our engine a second time from another installation (say, a checkout of an earlier commit
with its own venv) in the same alternating rounds, and adds its column and the ratio ours/baseline: how a change
moved our figures, measured side by side rather than against a table from another day.

Models: "tiny" (docs/architecture.md §15.1, q8xq5, real vocabulary) and "medium" (written once to
~/.cache/llama-dsv4/bench/: 8 layers of every kind, n_embd 1024, 128 experts top-6, q8xq5, 1.06 GiB), each also as
"tiny-DTYPE" / "medium-DTYPE" in any of the writer's dtypes and llama.cpp's file types (medium-Q4_K_M,
medium-Q2_K, ...), or any deepseek4 GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# The start of every child (bench/busy.py's too): argv is engine ("ours" or "reference"), GGUF path, JSON config;
# `llama_cpp` is the engine's module. DSV4_ORACLE_NO_REPACK=1: the reference without AMX-repacked weights, on which
# llama.cpp 0c1e570 aborts with quantized deepseek4 files on a CPU with AMX (GGML_ASSERT(*cur_backend_id != -1)).
PRELUDE = r"""
import json, os, sys, time
import numpy as np
engine, path, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if engine == "ours":
    import llama_dsv4 as llama_cpp
else:
    import llama_cpp
    if os.environ.get("DSV4_ORACLE_NO_REPACK") == "1":
        _defaults = llama_cpp.llama_cpp.llama_model_default_params
        def _no_repack():
            p = _defaults()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama_cpp.llama_model_default_params = _no_repack
"""

CHILD = (
    PRELUDE
    + r"""
th = cfg["threads"]
n_ctx = max(cfg["depths"]) + 128 + 16 if cfg["depths"] else 1024
n_ctx = max(n_ctx, 1024)
t = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=th, n_threads_batch=th,
                      verbose=False)
out = {"load": time.perf_counter() - t}
rng = np.random.default_rng(1)
nv = llm.n_vocab()
toks = [int(x) for x in rng.integers(3, nv, max(max(cfg["depths"] or [0]), 512) + 256)]
llm.reset()
t = time.perf_counter()
llm.eval(toks[:64])  # the first eval after load: weights are read from the page cache (or disk) as touched
out["pp64cold"] = 64 / (time.perf_counter() - t)
llm.reset()
llm.eval(toks[:512])  # untimed warm-up, as llama-bench does
for n in (64, 512):
    rates = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(toks[:n])
        rates.append(n / (time.perf_counter() - t))
    out[f"pp{n}"] = sorted(rates)[1]
llm.reset()
t = time.perf_counter()
llm.create_completion(toks[:512], max_tokens=1, temperature=0)
out["ttft"] = time.perf_counter() - t
ctx = getattr(llm, "_ctx", None) if engine == "ours" else None
for d in cfg["depths"]:
    llm.reset()
    if d:
        llm.eval(toks[:d])
    g0, i0, c0 = (ctx.t_graph, ctx.t_inputs, ctx.t_compute) if ctx is not None else (0.0, 0.0, 0.0)
    t = time.perf_counter()
    for i in range(128):
        llm.eval([toks[d + i]])
    dt = time.perf_counter() - t
    out[f"tg128@{d}"] = 128 / dt
    if ctx is not None:
        out[f"glue@{d}"] = 1 - (ctx.t_graph - g0 + ctx.t_compute - c0) / dt  # Python: API, sampling, inputs
        out[f"inputs@{d}"] = (ctx.t_inputs - i0) / dt
        out[f"graph@{d}"] = (ctx.t_graph - g0) / dt
# VmHWM: this process's peak RSS (ru_maxrss would include the parent's from before exec)
out["rss"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""
)

MEDIUM = dict(
    n_embd=1024,
    n_layer=8,
    compress_ratios=(0, 4, 128, 4, 128, 4, 128, 0),
    hash_layer_count=2,
    n_expert=128,
    n_expert_used=6,
    expert_ff=512,
    n_head=8,
    head_dim=128,
    rope_dim=64,
    q_lora_rank=256,
    o_group_count=2,
    o_lora_rank=128,
)


def model(name: str) -> str:
    from llama_dsv4.model.params import DSV4Params
    from llama_dsv4.model.writer import write_model

    if os.path.exists(name):
        return name
    size, _, dtype = name.partition("-")  # "medium" (q8xq5) or "medium-Q4_K_M": any of the writer's dtypes
    if size not in ("tiny", "medium"):
        raise SystemExit(f"--model: {name!r} is neither a file nor tiny/medium[-DTYPE]")
    dtype = dtype or "q8xq5"
    d = os.path.join(os.path.expanduser("~"), ".cache", "llama-dsv4", "bench")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"speed-{size}-{dtype.lower()}.gguf")
    if not os.path.exists(path):
        p = DSV4Params() if size == "tiny" else DSV4Params(**MEDIUM)
        write_model(path + ".part", p, dtype=dtype, vocab="real", name=f"speed bench {size} {dtype}")
        os.replace(path + ".part", path)
    return path


def bytes_per_token(path: str) -> int:
    from llama_dsv4.model.loader import load_model

    with load_model(path) as m:
        p = m.params
        n = 0
        for name, t in m.tensors.items():
            if name == "token_embd.weight":
                n += t.nbytes // p.n_vocab
            elif name.endswith("_exps.weight"):
                n += t.nbytes * p.n_expert_used // p.n_expert
            elif name.startswith("blk.") and int(name.split(".")[1]) >= p.n_layer:
                continue  # MTP, not run
            else:
                n += t.nbytes
        return n


def bandwidth() -> float:
    a = np.ones(512 << 20, np.uint8)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def seqs_arguments(doc: str | None, count: str, count_help: str) -> argparse.Namespace:
    """The command line of the N-sequence benchmarks (bench/multiseq.py, bench/batching.py): --model, --threads,
    --rounds, --seqs, and their own count of decode steps or tokens (`count`, default 32)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(f"--{count}", type=int, default=32, help=count_help)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqs", default="1,2,4,8", help="the numbers of sequences, comma-separated")
    return ap.parse_args()


def run_child(engine: str, python: str, code: str, path: str, cfg: dict) -> dict:
    """Run a child (PRELUDE + measurement code) for one engine; the JSON object it prints last."""
    p = subprocess.run([python, "-c", code, engine, path, json.dumps(cfg)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{engine} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python")
    ap.add_argument("--model", default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="0,1024,8192")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-python", help="a python whose llama_dsv4 is the baseline (another checkout)")
    a = ap.parse_args()
    path = model(a.model)
    cfg = {"threads": a.threads, "depths": [int(x) for x in a.depths.split(",") if x]}
    engines = [("ours", "ours", sys.executable)]  # (column, engine, python)
    engines += [("reference", "reference", a.oracle_python)] if a.oracle_python else []
    engines += [("baseline", "ours", a.baseline_python)] if a.baseline_python else []
    res: dict[str, list[dict]] = {c: [] for c, _, _ in engines}
    for r in range(a.rounds):
        for c, e, py in engines if r % 2 == 0 else engines[::-1]:
            res[c].append(run_child(e, py, CHILD, path, cfg))
    bpt, bw = bytes_per_token(path), bandwidth()
    size = os.path.getsize(path) if os.path.exists(path) else 0
    print(
        f"{os.path.basename(path)} ({size / 2**20:.0f} MiB), {a.threads} threads, {a.rounds} rounds, medians; "
        f"{os.cpu_count()} CPUs"
    )
    keys = ["load", "pp64cold", "pp64", "pp512", "ttft"] + [f"tg128@{d}" for d in cfg["depths"]] + ["rss"]
    unit = {"load": "s", "ttft": "s", "rss": "MiB"}
    others = [c for c in ("reference", "baseline") if c in res]
    print(f"{'metric':14s} {'ours':>10s}" + "".join(f" {c:>10s} {'ratio':>7s}" for c in others))
    for k in keys:
        o = statistics.median(x[k] for x in res["ours"])
        line = f"{k + (' ' + unit[k] if k in unit else ' tok/s'):14s} {o:10.2f}"
        for c in others:
            ref = statistics.median(x[k] for x in res[c])
            better = ref / o if k in ("load", "ttft", "rss") else o / ref  # > 1: ours better
            line += f" {ref:10.2f} {better:6.2f}x"
        print(line)
    for d in cfg["depths"]:
        glue = statistics.median(x[f"glue@{d}"] for x in res["ours"])
        graph = statistics.median(x[f"graph@{d}"] for x in res["ours"])
        inputs = statistics.median(x[f"inputs@{d}"] for x in res["ours"])
        print(
            f"ours, decode @{d}: Python {100 * glue:.1f}% of wall time (of which graph inputs {100 * inputs:.1f}%), "
            f"graph build and allocation in C {100 * graph:.1f}%"
        )
    print(
        f"decode ceiling: {bpt / 2**20:.1f} MiB of weights per token / {bw / 1e9:.1f} GB/s (numpy copy, 1 thread) "
        f"= {bw / bpt:.0f} tokens/s"
    )
    print("each ratio: ours relative to the column before it, > 1 means ours is better (faster, or smaller for s, MiB)")


if __name__ == "__main__":
    main()
