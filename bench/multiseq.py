"""Decode throughput with several sequences in one ubatch (docs/batching.md): N sequences each decode one token per
ubatch (Context.eval_batch), for N = 1, 2, 4, 8, on bench/speed.py's models. If each weight is read once per
ubatch for all sequences, the aggregate tokens/s grows with N while a ubatch's time grows much less than N.

    python bench/multiseq.py [--model tiny|medium|PATH] [--threads 2] [--steps 32] [--rounds 3] [--seqs 1,2,4,8]

Prints per N: the median over rounds of the time of one ubatch, the aggregate decode tokens/s, per sequence, and
the aggregate's ratio to N = 1 (N independent single-sequence decodes would give 1.0); then the weights a ubatch
reads if each is read once: every weight but the routed experts and the embedding rows, plus the distinct routed
experts its tokens chose (counted per layer through Context.route_sink), against N times one token's reads, and
that over the ubatch's time. Distinct tokens route to mostly distinct experts, so the routed experts' reads grow
with N, the rest does not.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np
from llama_dsv4.engine.context import Context

from llama_dsv4 import _ggml
from llama_dsv4.model.loader import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import model, seqs_arguments  # bench/ is not a package: beside this script

PROMPT = 32


def weight_bytes(m: Any) -> tuple[int, int]:
    """(bytes of every weight a ubatch reads whatever its tokens: all but the routed experts and the embedding
    table, bytes of one routed expert of one layer)."""
    p = m.params
    shared, experts = 0, 0
    for name, t in m.tensors.items():
        if name.startswith("blk.") and int(name.split(".")[1]) >= p.n_layer:
            continue  # MTP, not run
        if name.endswith("_exps.weight"):
            experts += t.nbytes
        elif name != "token_embd.weight":
            shared += t.nbytes
    return shared, experts // (p.n_expert * p.n_layer)


def decode(m: Any, n_seq: int, steps: int, threads: int, seed: int) -> tuple[float, float]:
    """(seconds per ubatch of n_seq greedy decode tokens after a prompt of PROMPT tokens per sequence, distinct
    routed experts per ubatch summed over the layers)."""
    ctx = Context(m, PROMPT + steps + 16, n_ubatch=64, backends=_ggml.Backends("cpu", threads), n_seq=n_seq)
    rng = np.random.default_rng(seed)
    nv = ctx.params.n_vocab
    last = [ctx.eval(rng.integers(3, nv, PROMPT), seq_id=s)[-1] for s in range(n_seq)]
    ctx.eval_batch([(s, [int(lg.argmax())]) for s, lg in enumerate(last)])  # untimed: the first mixed graph
    distinct: list[int] = []
    ctx.route_sink = lambda routes, toks: distinct.append(sum(len(np.unique(r)) for r in routes))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = ctx.eval_batch([(s, [int(lg.argmax())]) for s, lg in enumerate(last)])
        last = [lg[-1] for lg in out]
    return (time.perf_counter() - t0) / steps, float(np.mean(distinct))


def main() -> None:
    args = seqs_arguments(__doc__, "steps", "decode steps per measurement")
    seqs = [int(x) for x in args.seqs.split(",")]
    path = model(args.model)
    with load_model(path) as m:
        shared, expert = weight_bytes(m)
        per_token = shared + expert * m.params.n_expert_used * m.params.n_layer
        times: dict[int, list[float]] = {n: [] for n in seqs}
        experts: dict[int, list[float]] = {n: [] for n in seqs}
        for r in range(args.rounds):  # interleaved, so a change of machine load touches every N alike
            for n in seqs:
                dt, distinct = decode(m, n, args.steps, args.threads, seed=r)
                times[n].append(dt)
                experts[n].append(distinct)
    print(f"model {os.path.basename(path)}, {args.threads} threads, {args.steps} steps, median of {args.rounds}")
    print(
        f"{'seqs':>5} {'ms/ubatch':>10} {'tok/s all':>10} {'tok/s/seq':>10} {'vs 1 seq':>9} "
        f"{'MiB read':>9} {'vs N x 1':>9} {'GB/s':>6}"
    )
    one = 1 / statistics.median(times[1]) if 1 in times else None
    for n in seqs:
        dt = statistics.median(times[n])
        agg = n / dt
        ratio = f"{agg / one:>8.2f}x" if one else f"{'-':>9}"
        read = shared + expert * statistics.median(experts[n])
        print(
            f"{n:>5} {dt * 1e3:>10.2f} {agg:>10.1f} {agg / n:>10.1f} {ratio} {read / 2**20:>9.1f} "
            f"{read / (n * per_token):>9.2f} {read / dt / 1e9:>6.1f}"
        )


if __name__ == "__main__":
    main()
