"""Decode speed on a busy machine, side by side with llama.cpp (llama-cpp-python 0.3.36, run as bench/speed.py runs
it), on the same GGUF: each engine in its own process with its default thread count (or --threads), next to 0, 1,
2, ... busy processes (`python3 -c "while True: pass"`, started by this script and always killed), R rounds
alternating the engines.
The table shows the median decode speed (single-token evals after a 32-token prompt) and its ratio to the same
engine's speed with no busy process.

    python bench/busy.py --oracle-python PY [--model tiny|medium|PATH] [--busy 0,1,2]
        [--rounds 3] [-n 128] [--threads N]      (PY: the reference's python, from tools/oracle/setup.sh)

Models as bench/speed.py's ("medium" is written once to ~/.cache/llama-dsv4/bench/). On a CPU with AMX set
DSV4_ORACLE_NO_REPACK=1 for quantized files (the reference aborts otherwise). Ours: the thread count it used at
the end (the contention governor's, docs/design.md "Threads"), in the last column.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

from speed import PRELUDE, model, run_child

CHILD = (
    PRELUDE
    + r"""
n = cfg["n"]
th = {"n_threads": cfg["threads"], "n_threads_batch": cfg["threads"]} if cfg["threads"] else {}  # else defaults
llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, n + 64), verbose=False, **th)
rng = np.random.default_rng(1)
toks = [int(x) for x in rng.integers(3, llm.n_vocab(), n + 32)]
llm.eval(toks[:32])
t = time.perf_counter()
for i in range(n):
    llm.eval([toks[32 + i]])
out = {"tps": n / (time.perf_counter() - t), "threads": llm.n_threads}
gov = getattr(llm, "_governor", None)
if gov is not None:
    out["used"] = min(gov.cap, llm.n_threads)
print(json.dumps(out))
"""
)

BUSY = "while True: pass"


class Busy:
    """n busy processes for the length of a `with` block, killed however the block ends (also on SIGTERM)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)  # let the scheduler spread them
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python")
    ap.add_argument("--model", default="medium")
    ap.add_argument("--busy", default="0,1,2", help="numbers of busy processes (0 is needed for the ratios)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=128, help="decoded tokens per run")
    ap.add_argument("--threads", type=int, default=0, help="threads for both engines (default: each engine's own)")
    a = ap.parse_args()
    levels = sorted({int(x) for x in a.busy.split(",") if x} | {0})
    path = model(a.model)
    engines = [("ours", sys.executable)] + ([("reference", a.oracle_python)] if a.oracle_python else [])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the Busy exits (finally) on a plain kill too
    res: dict[tuple[str, int], list[dict]] = {}
    for level in levels:
        with Busy(level):
            for r in range(a.rounds):
                for e, py in engines if r % 2 == 0 else engines[::-1]:
                    res.setdefault((e, level), []).append(
                        run_child(e, py, CHILD, path, {"n": a.n, "threads": a.threads})
                    )

    def tps(e: str, level: int) -> float:
        return statistics.median(x["tps"] for x in res[(e, level)])

    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}: {os.path.basename(path)}, decode {a.n} tokens, "
        f"{'default threads' if not a.threads else 'threads'} "
        f"(ours {res[('ours', 0)][0]['threads']}"
        + (f", reference {res[('reference', 0)][0]['threads']}" if a.oracle_python else "")
        + f"), {len(os.sched_getaffinity(0))} CPUs, {a.rounds} rounds, medians\n"
    )
    head = "| busy processes | ours tok/s | ours vs idle |"
    rule = "|---:|---:|---:|"
    if a.oracle_python:
        head += " llama.cpp tok/s | llama.cpp vs idle |"
        rule += "---:|---:|"
    print(head + " ours: threads used at the end |")
    print(rule + "---|")
    for level in levels:
        line = f"| {level} | {tps('ours', level):.1f} | {tps('ours', level) / tps('ours', 0):.2f} |"
        if a.oracle_python:
            line += f" {tps('reference', level):.1f} | {tps('reference', level) / tps('reference', 0):.2f} |"
        used = sorted({x.get("used", x["threads"]) for x in res[("ours", level)]})
        print(line + f" {', '.join(map(str, used))} |")


if __name__ == "__main__":
    main()
