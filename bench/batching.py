"""Decode throughput of N concurrent completions on one Llama (continuous batching, docs/batching.md): N prompts
through `Llama.create_completions` on a context of N sequences, for N = 1, 2, 4, 8, on bench/speed.py's models.
Unlike bench/multiseq.py (the engine's eval_batch alone), this goes through the whole API: one thread per
completion, the runner's batcher lining their decode calls up, sampling in each thread.

    python bench/batching.py [--model tiny|medium|PATH] [--threads 2] [--tokens 32] [--rounds 3] [--seqs 1,2,4,8]

Per N: the median over rounds of the aggregate decode tokens/s (the completion tokens after the first, over the
time of N completions of --tokens tokens less that of N completions of one token: the prompts and first tokens
are not counted), its ratio to N = 1, and how many sequences the batcher's steps held on average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from llama_dsv4 import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import model, seqs_arguments  # bench/ is not a package: beside this script

PROMPT = 32


def timed(llm: Llama, prompts: list[list[int]], n_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one create_completions call (greedy, the end token forbidden)."""
    bias = {llm.token_eos(): -1e9} if llm.token_eos() >= 0 else None
    t0 = time.perf_counter()
    out = llm.create_completions(prompts, max_tokens=n_tokens, temperature=0, logit_bias=bias)
    return time.perf_counter() - t0, sum(r["usage"]["completion_tokens"] for r in out)


def measure(path: str, n: int, n_tokens: int, threads: int, rounds: int) -> tuple[float, float]:
    """(median aggregate decode tokens/s, mean sequences per batcher step) of n concurrent completions."""
    llm = Llama(
        path, n_ctx=PROMPT + n_tokens + 16, n_seq_max=n, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    widths: list[int] = []
    runner: Any = llm._runner
    if runner.batcher is not None:
        inner = runner.eval_batch

        def counting(seqs: Any, every: bool, t: int) -> Any:
            widths.append(len(seqs))
            return inner(seqs, every, t)

        runner.eval_batch = counting
    rates = []
    try:
        for r in range(rounds):
            rng = np.random.default_rng(r)
            prompts = [rng.integers(3, llm.n_vocab(), PROMPT).tolist() for _ in range(n)]
            timed(llm, prompts, 1)  # (untimed: the graphs of this mix; then the prompt reuses its evaluation)
            t1, _ = timed(llm, prompts, 1)
            tn, count = timed(llm, prompts, n_tokens)
            rates.append((count - n) / max(tn - t1, 1e-9))
    finally:
        llm.close()
    return statistics.median(rates), (float(np.mean(widths)) if widths else 1.0)


def main() -> None:
    args = seqs_arguments(__doc__, "tokens", "tokens per completion")
    path = model(args.model)
    print(f"{os.path.basename(path)}, {args.threads} threads, {args.tokens} tokens per completion")
    print(f"{'N':>3} {'tok/s':>9} {'per seq':>9} {'vs N=1':>7} {'seqs/step':>9}")
    base = None
    for n in (int(x) for x in args.seqs.split(",")):
        rate, width = measure(path, n, args.tokens, args.threads, args.rounds)
        base = base or rate
        print(f"{n:>3} {rate:>9.1f} {rate / n:>9.1f} {rate / base:>7.2f} {width:>9.2f}")


if __name__ == "__main__":
    main()
