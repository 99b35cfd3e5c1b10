"""Time the demo network's training step: `python -m train.step_time [--steps N] [--threads T]`.

A step as `train.train` takes it (forward with the MTP head, backward, gradient clipping, AdamW, the selection
bias), on random tokens, for the demo shape (`train.train.demo_params`, batch 7 x 576 tokens by default), with the
sliding window computed in blocks (what training uses) and over all [T, T] pairs (as the recipe did before
2026-12-07), and with `--compile` the step of `train.train --compile` too (torch.compile's inductor; its first,
untimed step is the compile, reported beside the table), one after the other, and a table of the medians and their
ratio. How many steps fit in a run's minutes follows from it.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time

import torch

from .model import DSV4
from .train import compiled, demo_params, train_step


def step_seconds(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """The wall time of one training step (train.train's) on `batch`."""
    t = time.perf_counter()
    train_step(net, opt, batch)
    return time.perf_counter() - t


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one untimed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=7)
    ap.add_argument("--seq", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="also time the compiled step (minutes of compiling first)")
    a = ap.parse_args()
    if a.steps < 1 or a.batch < 1 or a.seq < 2:
        ap.error("--steps and --batch must be at least 1, --seq at least 2")
    torch.set_num_threads(a.threads)
    torch.manual_seed(17)
    p = demo_params(a.vocab)
    variants = {"window in blocks (train.train)": False, "window over all [T, T] pairs": True}
    compiled_name = "window in blocks, compiled (train.train --compile)"
    if a.compile:
        variants[compiled_name] = False
    nets: dict[str, torch.nn.Module] = {}
    opts = {}
    for name, dense in variants.items():
        net = DSV4(p, seed=17, max_pos=a.seq).train()
        net.dense_window = dense
        nets[name] = compiled(net) if name == compiled_name else net
        opts[name] = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {name: [] for name in variants}
    compile_s = 0.0
    for name in variants:  # one variant after the other: alternating steps cost both a third more here
        for i in range(a.steps + 1):
            t = step_seconds(nets[name], opts[name], torch.randint(0, a.vocab, (a.batch, a.seq)))
            if i:  # the first step warms up allocations (and compiles)
                times[name].append(t)
            elif name == compiled_name:
                compile_s = t
    print(f"{cpu_name()}, {a.threads} threads, torch {torch.__version__}; "
          f"batch {a.batch} x {a.seq} tokens, {a.steps} steps each (medians)")  # fmt: skip
    print("| variant | s/step | tokens/s | vs all pairs |")
    print("|---|---|---|---|")
    base = statistics.median(times["window over all [T, T] pairs"])
    for name in variants:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.3f} | {a.batch * a.seq / m:,.0f} | {base / m:.2f}x |")
    if a.compile:
        print(f"the compiled variant's first step (the compile): {compile_s:.0f} s")


if __name__ == "__main__":
    main()
