"""Decode speed of llama-dsv4 next to the reference implementation on the tiny deepseek4 model
(docs/architecture.md §15.1).

    python bench/forward_tiny.py --oracle-python $(tools/oracle/setup.sh) [--dtype q8xq5] [--threads 2]

Both engines: the same model file, a prompt of P token ids in one ubatch, then N greedy steps one token at a time
(the reference in its own process, through tools/oracle/reference.py greedy). Prints a table with the median of
R repetitions, the ratio, and whether both generated the same tokens. A fuller harness is issue 8's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_dsv4.engine.context import Context

from llama_dsv4 import _ggml
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(path: str, prompt: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    with load_model(path) as m:
        ctx = Context(m, len(prompt) + n + 16, n_ubatch=64, backends=_ggml.Backends("cpu", threads))
        last = ctx.eval(prompt)[0]
        out = []
        t0 = time.perf_counter()
        for _ in range(n):
            out.append(int(last.argmax()))
            last = ctx.eval([out[-1]])[0]
        dt = (time.perf_counter() - t0) / n
        del ctx
    return dt, out


def reference(oracle: str, script: str, path: str, prompt: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gen.json")
        subprocess.run(
            [
                oracle,
                script,
                "greedy",
                path,
                "--tokens",
                ",".join(map(str, prompt)),
                "-n",
                str(n),
                "--threads",
                str(threads),
                "--out",
                out,
            ],
            check=True,
            capture_output=True,
        )
        with open(out) as f:
            r = json.load(f)
    return r["seconds_per_token"], r["generated"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python", help="the reference's python (tools/oracle/setup.sh prints it)")
    ap.add_argument("--logits-script", default=os.path.join(HERE, "..", "tools", "oracle", "reference.py"))
    ap.add_argument("--dtype", default="q8xq5", choices=["f32", "f16", "q8xq5"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=64)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(os.path.join(tmp, "tiny.gguf"), DSV4Params(), dtype=a.dtype, vocab="small")[0]
        prompt = np.random.default_rng(0).integers(3, 512, a.prompt).tolist()
        rows = []
        res = {"llama-dsv4": [ours(path, prompt, a.n, a.threads) for _ in range(a.reps)]}
        if a.oracle_python:
            res["llama.cpp (reference)"] = [
                reference(a.oracle_python, a.logits_script, path, prompt, a.n, a.threads) for _ in range(a.reps)
            ]
        base = statistics.median(t for t, _ in res["llama-dsv4"])
        for name, runs in res.items():
            dt = statistics.median(t for t, _ in runs)
            rows.append((name, 1 / dt, dt * 1e3, base / dt))  # 1 / ratio: our speed over this engine's
        print(
            f"tiny deepseek4 (docs/architecture.md §15.1), {a.dtype}, {a.threads} threads, prompt {a.prompt}, "
            f"decode {a.n} tokens, median of {a.reps}"
        )
        print(f"{'engine':24s} {'decode tok/s':>12s} {'ms/token':>9s} {'llama-dsv4 / engine':>20s}")
        for name, tps, ms, ratio in rows:
            print(f"{name:24s} {tps:12.1f} {ms:9.2f} {1 / ratio:19.2f}x")
        if len(res) > 1:
            same = res["llama-dsv4"][0][1] == res["llama.cpp (reference)"][0][1]
            print(f"same greedy tokens: {same}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
