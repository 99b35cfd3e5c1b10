"""Per-token cost of constrained decoding with the full 129k-token DeepSeek V4 vocabulary, ours (llguidance) next to
llama-cpp-python's (llama.cpp's GBNF sampler), on a tiny random-weight model whose forward pass is cheap, so the
grammar's share shows.

For each engine: ms per generated token (time between streamed tokens, so the prompt is not counted) without a
grammar, with the JSON GBNF grammar, and the difference (the grammar's overhead per token). For ours also the
grammar's own time per token, measured inside the sampler.

    python bench/grammar.py [--oracle-python $(tools/oracle/setup.sh)] [--tokens 64] [--runs 10]
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

from llama_dsv4 import Llama, LlamaGrammar
from llama_dsv4.grammar import JSON_GBNF
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model
from llama_dsv4.sampling.constrained import GrammarState

PROMPT = "Reply with a JSON object describing a cat:"

ORACLE_SNIPPET = """
import sys, time, json, llama_cpp
path, gbnf, prompt, n, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
g = llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
out = {}
for name, grammar in (("free", None), ("json", g)):
    per = []
    for r in range(runs):
        stream = llm(prompt, max_tokens=n, temperature=0.8, seed=r + 1, grammar=grammar, stream=True)
        ts = [time.perf_counter() for _ in stream]
        if len(ts) > 2:
            per.append((ts[-1] - ts[0]) / (len(ts) - 1) * 1e3)
    out[name] = per
print(json.dumps(out))
"""


def ours(path: str, n: int, runs: int) -> tuple[dict[str, list[float]], list[float]]:
    llm = Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
    grammar = LlamaGrammar.from_string(JSON_GBNF)
    out: dict[str, list[float]] = {}
    for name, g in (("free", None), ("json", grammar)):
        per = []
        for r in range(runs):
            ts = [
                time.perf_counter()
                for _ in llm(PROMPT, max_tokens=n, temperature=0.8, seed=r + 1, grammar=g, stream=True)
            ]
            if len(ts) > 2:  # time between streamed tokens: decode + sampling + grammar, not the prompt
                per.append((ts[-1] - ts[0]) / (len(ts) - 1) * 1e3)
        out[name] = per
    # the grammar's own time inside the sampler (mask + accept), timed per token over the same runs
    inside: list[float] = []
    mask, accept = GrammarState.mask, GrammarState.accept

    def timed(f):  # type: ignore[no-untyped-def]
        def g(*args):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            r = f(*args)
            inside.append((time.perf_counter() - t) * 1e3)
            return r

        return g

    GrammarState.mask, GrammarState.accept = timed(mask), timed(accept)  # type: ignore[method-assign]
    try:
        for r in range(runs):
            llm(PROMPT, max_tokens=n, temperature=0.8, seed=r + 1, grammar=grammar)
    finally:
        GrammarState.mask, GrammarState.accept = mask, accept  # type: ignore[method-assign]
    llm.close()
    return out, [a + b for a, b in zip(inside[0::2], inside[1::2], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(os.path.join(tmp, "g.gguf"), DSV4Params(n_embd=256), vocab="real", dtype="f16")[0]
        rows = []
        res, masks = ours(path, a.tokens, a.runs)
        rows.append(("llama-dsv4 (llguidance)", res))
        if a.oracle_python:
            r = subprocess.run(
                [a.oracle_python, "-c", ORACLE_SNIPPET, path, JSON_GBNF, PROMPT, str(a.tokens), str(a.runs)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(("llama-cpp-python 0.3.36", json.loads(r.stdout.strip().splitlines()[-1])))
    print(
        f"constrained decoding, vocabulary 129,280 tokens, tiny model (n_embd 256, f16), 1 thread, "
        f"{a.tokens} tokens x {a.runs} runs, medians in ms per generated token"
    )
    print(f"{'engine':28s} {'free':>8s} {'json':>8s} {'overhead':>9s}")
    for name, res in rows:
        free, js = statistics.median(res["free"]), statistics.median(res["json"])
        print(f"{name:28s} {free:8.3f} {js:8.3f} {js - free:9.3f}")
    if len(rows) == 2:
        ref = statistics.median(rows[1][1]["json"]) - statistics.median(rows[1][1]["free"])
        print(f"grammar overhead per token (json - free), reference: {ref:.3f} ms")
    inside = statistics.median(masks)
    print(f"ours, grammar time inside the sampler (llguidance mask + unpack + apply + accept): {inside:.3f} ms/token")
    print("(the json - free difference of ours is mostly run-to-run noise of decode; the line above is its cost)")


if __name__ == "__main__":
    sys.exit(main())
