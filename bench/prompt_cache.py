"""Prompt reuse across requests (docs/batching.md "Prompt reuse"): time to first token of a second request that
shares a long prefix with the first, with and without reuse, ours and the reference (llama.cpp in
llama-cpp-python 0.3.36), each in its own process, alternating, R rounds; medians.

First request: a prefix of P tokens + a question of Q tokens, answered with A tokens (greedy). Second request: the
same prefix + another question of Q tokens, one token generated (its time is the time to first token):
  reuse     right after the first: the Llama keeps the longest common prefix of what it holds (P + the shared
            start of the questions) and evaluates the rest; ours truncates its state there (Context.truncate)
  no reuse  after llm.reset(): the whole prompt is evaluated
For ours also the positions the truncation evaluated again.

    python bench/prompt_cache.py --oracle-python $(tools/oracle/setup.sh) [--model medium|tiny|PATH] [--threads 2]
        [--prefix 2000] [--question 24] [--answer 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import PRELUDE, model, run_child  # bench/ is not a package: beside this script

CHILD = (
    PRELUDE
    + r"""
th = cfg["threads"]
P, Q, A = cfg["prefix"], cfg["question"], cfg["answer"]
llm = llama_cpp.Llama(model_path=path, n_ctx=P + 2 * Q + A + 64, n_batch=512, n_ubatch=512, n_threads=th,
                      n_threads_batch=th, verbose=False)
rng = np.random.default_rng(cfg["seed"])
nv = llm.n_vocab()
prefix, q1, q2 = ([int(x) for x in rng.integers(3, nv, n)] for n in (P, Q, Q))
no_eos = {llm.token_eos(): -1e9}
evaluated = []
if engine == "ours":
    runner = llm._runner
    plain = runner.truncate
    runner.truncate = lambda *a: evaluated.append(plain(*a)) or evaluated[-1]
first = llm.create_completion(prefix + q1, max_tokens=A, temperature=0, logit_bias=no_eos)
out = {"answer": first["usage"]["completion_tokens"]}
t = time.perf_counter()
llm.create_completion(prefix + q2, max_tokens=1, temperature=0)
out["reuse"] = time.perf_counter() - t
out["evaluated"] = evaluated[-1] if evaluated else -1
llm.reset()
t = time.perf_counter()
llm.create_completion(prefix + q2, max_tokens=1, temperature=0)
out["no_reuse"] = time.perf_counter() - t
print(json.dumps(out))
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python")
    ap.add_argument("--model", default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--question", type=int, default=24)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    path = model(a.model)
    cfg = {"threads": a.threads, "prefix": a.prefix, "question": a.question, "answer": a.answer, "seed": 1}
    engines = [("ours", sys.executable)] + ([("reference", a.oracle_python)] if a.oracle_python else [])
    res: dict[str, list[dict]] = {e: [] for e, _ in engines}
    for r in range(a.rounds):
        for e, py in engines if r % 2 == 0 else engines[::-1]:
            res[e].append(run_child(e, py, CHILD, path, cfg))
    print(
        f"{os.path.basename(path)}, {a.threads} threads, {a.rounds} rounds, medians; first request {a.prefix} + "
        f"{a.question} tokens answered with {a.answer}, second {a.prefix} + {a.question} other tokens"
    )
    print(f"{'engine':10s} {'ttft reuse s':>13s} {'ttft no reuse s':>16s} {'speed-up':>9s}  notes")
    for e, runs in res.items():
        reuse = statistics.median(x["reuse"] for x in runs)
        full = statistics.median(x["no_reuse"] for x in runs)
        notes = f"answers of {sorted({x['answer'] for x in runs})} tokens"
        if e == "ours":
            notes += f"; positions evaluated again by the truncation: {sorted({x['evaluated'] for x in runs})}"
        print(f"{e:10s} {reuse:13.3f} {full:16.3f} {full / reuse:8.1f}x  {notes}")


if __name__ == "__main__":
    main()
