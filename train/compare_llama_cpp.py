"""Our engine against llama.cpp on a trained run's exported files (the realistic fidelity test).

    python -m train.compare_llama_cpp --run RUN --data DIR --oracle-python PY --logits-script SCRIPT

PY is a Python with llama-cpp-python 0.3.36 (the reference build); SCRIPT is a llama.cpp driver taking the
commands `logits MODEL --tokens-file ids.npy --ubatch U --out ref.npz` (tokens, logits per position) and
`greedy MODEL --tokens 1,2,3 -n N --ubatch U --out gen.json` (generated ids). llama.cpp runs in that subprocess,
never in this one. Prints: greedy continuations of held-out chat prompts (up to the end token, at most --steps
tokens) identical to llama.cpp's (f32, f16 and q8xq5, ubatch 1 and 64), logits max|diff|/max|logit| per position
on held-out text, held-out perplexity of every variant by both engines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import tempfile
from typing import Any

import numpy as np
from llama_dsv4.engine.context import Context

from llama_dsv4 import _ggml
from llama_dsv4.model.loader import load_model
from llama_dsv4.tokenizer import DSV4Tokenizer

from . import data as D

ENV = {**os.environ, "DSV4_ORACLE_NO_REPACK": "1"}  # llama.cpp aborts after repacking Q8_0 for AMX


def ours_greedy(path: str, prompt: list[int], n: int, ubatch: int) -> list[int]:
    with load_model(path) as m:
        ctx = Context(m, len(prompt) + n + 16, n_ubatch=ubatch, backends=_ggml.Backends("cpu", 2))
        last = None
        for s in range(0, len(prompt), ubatch):
            last = ctx.eval(np.array(prompt[s : s + ubatch], np.int32))
        out = []
        for _ in range(n):
            nxt = int(np.asarray(last).reshape(-1).argmax())
            out.append(nxt)
            last = ctx.eval(np.array([nxt], np.int32))
        del ctx
    return out


def ours_logits(path: str, tokens: np.ndarray, ubatch: int) -> np.ndarray:
    with load_model(path) as m:
        ctx = Context(m, len(tokens) + 16, n_ubatch=ubatch, backends=_ggml.Backends("cpu", 2))
        out = np.concatenate([ctx.eval(tokens[s : s + ubatch], all_logits=True) for s in range(0, len(tokens), ubatch)])
        del ctx
    return out


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """A greedy continuation as generated: up to and with the end token (what follows it nobody generates)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def oracle(a: argparse.Namespace, *args: str) -> None:
    subprocess.run([a.oracle_python, a.logits_script, *args], check=True, env=ENV, capture_output=True)


def nll(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    lg = logits[:-1].astype(np.float64)
    m = lg.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(lg - m).sum(1))) - lg[np.arange(len(lg)), tokens[1:]]
    return float(lse.sum()), len(lg)


def write_reference(a: argparse.Namespace, path: str, prompts: list[list[int]], requests: list[Any], tmp: str) -> None:
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    cases = []
    for pr, req in zip(prompts, requests, strict=True):
        out = os.path.join(tmp, "g.json")
        oracle(a, "greedy", path, "--tokens", ",".join(map(str, pr)), "-n", "48", "--ubatch", "64", "--out", out)
        with open(out) as f:
            cases.append({**req, "prompt": pr, "llama_cpp_greedy": json.load(f)["generated"]})
    with open(a.write_reference, "w", encoding="utf-8") as f:
        json.dump({"model_sha256": sha, "ubatch": 64, "n": 48, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {a.write_reference}: llama.cpp's greedy continuations of {len(cases)} prompts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--oracle-python", required=True)
    ap.add_argument("--logits-script", required=True)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4, help="held-out text windows of 448 tokens for perplexity")
    ap.add_argument(
        "--write-reference",
        metavar="JSON",
        help="write llama.cpp's greedy continuations of the first 6 prompts on the q8xq5 file (the shipped demo "
        "model), with the prompts and the file's SHA-256, for tests/test_demo_model.py",
    )
    a = ap.parse_args()
    with open(os.path.join(a.data, "vocab.json"), encoding="utf-8") as f:
        vocab = D.vocab_from_json(json.load(f))
    tk, eos = DSV4Tokenizer(vocab), vocab.eos_id
    with open(os.path.join(a.data, "heldout.json")) as f:
        held = json.load(f)
    rng = random.Random(2)
    prompts, requests = [], []
    for i in range(a.prompts):
        kind = ("arith", "tool", "json")[i % 3]
        p = held[kind][i // 3]
        if kind == "arith":
            msgs, tools = D.arithmetic_messages(*p, rng)[0][:1], None
        elif kind == "tool":
            msgs, tools = D.tool_messages(tuple(p), rng)[0][:1], D.TOOLS
        else:
            msgs, tools = D.json_messages((p[0], tuple(tuple(x) for x in p[1])))[0][:1], None
        text = D.render_chat(msgs, tools=tools, gen=True)
        prompts.append(tk.tokenize(text.encode(), add_bos=False, special=True))
        requests.append({"kind": kind, "messages": msgs, "tools": bool(tools)})
    paths = {dt: os.path.join(a.run, f"model-{dt}.gguf") for dt in ("f32", "f16", "q8xq5")}
    held_text = np.fromfile(os.path.join(a.data, "heldout_text.bin"), np.uint16).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        if a.write_reference:
            write_reference(a, paths["q8xq5"], prompts[:6], requests[:6], tmp)
        for dt in ("f32", "f16", "q8xq5"):
            for ub in (1, 64):
                same = ended = same_full = 0
                first_diff = []
                for pr in prompts:
                    out = os.path.join(tmp, "g.json")
                    oracle(a, "greedy", paths[dt], "--tokens", ",".join(map(str, pr)), "-n", str(a.steps),
                           "--ubatch", str(ub), "--out", out)  # fmt: skip
                    with open(out) as f:
                        ref = json.load(f)["generated"]
                    ours = ours_greedy(paths[dt], pr, a.steps, ub)
                    ended += eos in ref
                    same_full += ours == ref
                    ours, ref = until_eos(ours, eos), until_eos(ref, eos)  # a continuation ends with its end token
                    same += ours == ref
                    if ours != ref:
                        first_diff.append(next((i for i, (x, y) in enumerate(zip(ours, ref, strict=False)) if x != y),
                                               min(len(ours), len(ref))))  # fmt: skip
                print(f"greedy {dt} ubatch {ub}: {same}/{len(prompts)} continuations identical (up to the end token, "
                      f"at most {a.steps} tokens; llama.cpp's ended in {ended}; all {a.steps} tokens, past the end "
                      f"token too: {same_full})"
                      + (f" (first differences at steps {first_diff})" if first_diff else ""))  # fmt: skip
        for dt, path in paths.items():
            tot = [0.0, 0.0]
            n = 0
            rels = []
            for w in range(a.windows):
                toks = held_text[w * 448 : (w + 1) * 448]
                np.save(os.path.join(tmp, "t.npy"), toks)
                oracle(a, "logits", path, "--tokens-file", os.path.join(tmp, "t.npy"), "--ubatch", "64",
                       "--out", os.path.join(tmp, "r.npz"))  # fmt: skip
                ref = np.load(os.path.join(tmp, "r.npz"))["logits"]
                ours = ours_logits(path, toks, 64)
                rels.append(np.abs(ours - ref).max(1) / np.abs(ref).max(1))
                for i, lg in enumerate((ours, ref)):
                    s, k = nll(lg, toks)
                    tot[i] += s
                n += k
            rel = np.concatenate(rels)
            p_ours, p_ref = math.exp(tot[0] / n), math.exp(tot[1] / n)
            print(f"{dt}: logits max|diff|/max|logit| per position: max {rel.max():.2e} mean {rel.mean():.2e}; "
                  f"held-out perplexity ours {p_ours:.3f} llama.cpp {p_ref:.3f} ({(p_ours / p_ref - 1) * 100:+.3f} %) "
                  f"over {n} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
