"""MoE expert residency on a synthetic deepseek4 model big enough to matter: 128 experts top-6, Q5_K experts
(about 1.1 GB of expert weights), routing made skewed through the router bias and the hash tables (tid2eid).

Part 1, memory plentiful: for each mode (off, uniform 32 hot of 128 = the seed's "64 of 256", auto, auto with a
budget), after a learning phase: locked bytes (the kernel's VmLck), resident bytes of the expert tensors
(mincore), the online hit rate while decoding, and decode tokens/s.
Part 2, memory short: each mode in a memory cgroup limited below the model's size (the model's pages evicted
from the page cache first), decode tokens/s and major page faults per token. Needs a writable cgroup v1 memory
controller or cgroup v2 (root in most containers); skipped with the reason otherwise.

    python bench/moe_residency.py [--threads 2] [--limit-mib 900] [--tokens 48]

Each mode runs in its own process; the model is written once to ~/.cache/llama-dsv4/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from speed import MEDIUM  # bench/ is the script's directory

from llama_dsv4.model.loader import load_model
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import Init, write_model

PARAMS = DSV4Params(**MEDIUM)  # the speed benchmark's medium shape, with the small vocabulary
BIAS_SCALE = 0.25  # router bias = BIAS_SCALE * log(popularity): a long tail, not a handful of experts
MODES = {
    "off": {},
    "uniform 32": {"moe_hot_count": 32},
    "auto": {"moe_hot_count": "auto"},
    "auto, 400 MiB": {"moe_hot_count": "auto", "moe_hot_budget_mib": 400},
    "auto, drop cold": {"moe_hot_count": "auto", "moe_hot_budget_mib": 400, "moe_release_cold": True},
}


def model_path() -> str:
    d = os.path.join(os.path.expanduser("~"), ".cache", "llama-dsv4", "bench")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"moe-skewed{BIAS_SCALE}-128x6-q8xq5.gguf")
    if os.path.exists(path):
        return path
    tmp = path + ".part"
    write_model(tmp, PARAMS, dtype="q8xq5", init=Init(router_scale=0.3), name="moe residency bench")
    skew(tmp)
    os.replace(tmp, path)
    return path


def skew(path: str) -> None:
    """Zipf-like expert popularity: router bias decreasing with a per-layer permutation of the experts, and hash
    tables drawing each token's experts from the same law."""
    rng = np.random.default_rng(11)
    E, k = PARAMS.n_expert, PARAMS.n_expert_used
    pop = 1.0 / np.arange(1, E + 1) ** 1.1
    with load_model(path) as m:
        table = {n: (t.offset, t.nbytes) for n, t in m.tensors.items()}
    with open(path, "r+b") as f:
        for il in range(PARAMS.n_layer):
            perm = rng.permutation(E)
            if il < PARAMS.hash_layer_count:
                off, _ = table[f"blk.{il}.ffn_gate_tid2eid.weight"]
                p = pop / pop.sum()
                rows = np.stack([perm[rng.choice(E, k, replace=False, p=p)] for _ in range(PARAMS.n_vocab)])
                f.seek(off)
                f.write(rows.astype("<i4").tobytes())
            else:
                off, _ = table[f"blk.{il}.exp_probs_b.bias"]
                bias = np.empty(E, np.float32)
                bias[perm] = BIAS_SCALE * np.log(pop / pop.max())
                f.seek(off)
                f.write(bias.astype("<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


CHILD = r"""
import json, os, resource, sys, time, numpy as np
from llama_dsv4 import Llama
path, kw = sys.argv[1], json.loads(sys.argv[2])
threads, n_learn, n_tok = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
os.environ["HOME"] = sys.argv[6]
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=n_learn + n_tok + 64, n_batch=64, n_ubatch=64, n_threads=threads,
            verbose=False, **kw)
load_s = time.perf_counter() - t0
rng = np.random.default_rng(5)
if llm._moe is not None:
    llm._moe.config.interval = 128
llm.eval([int(x) for x in rng.integers(3, llm.n_vocab(), n_learn)])  # learning phase (prefill)
if llm._moe is not None:
    llm._moe._update()  # the hot set as learned
st0 = llm.moe_stats() or {}
h0, r0 = st0.get("hits", 0), st0.get("routed", 0)
maj0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
t1 = time.perf_counter()
for i in range(n_tok):
    llm.eval([int(rng.integers(3, llm.n_vocab()))])  # decode steps over random tokens
dt = time.perf_counter() - t1
maj = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - maj0
st = llm.moe_stats() or {}
hit = (st["hits"] - h0) / max(1, st["routed"] - r0) if st else None
if st:
    res = st["resident_bytes"]; locked = st["kernel_locked_bytes"]; hot = st["hot_per_layer"]
else:
    from llama_dsv4.moe.memory import Syscalls
    from llama_dsv4.moe.memory import PAGE
    sc, res = Syscalls(), 0
    for n in [n for n in llm._model.tensors if n.endswith("_exps.weight")]:
        a, nb = llm._ctx.weight_range(n)
        res += sc.resident(a // PAGE * PAGE, a % PAGE + nb)
    locked = Syscalls.locked_bytes(); hot = None
print(json.dumps({"tps": n_tok / dt, "majflt_per_tok": maj / n_tok, "hit": hit, "resident": res, "locked": locked,
                  "hot": hot, "load_s": load_s}))
llm.close()
"""


def run_mode(path: str, kw: dict, threads: int, n_learn: int, n_tok: int, home: str, cgroup: str | None) -> dict:
    cmd = [sys.executable, "-c", CHILD, path, json.dumps(kw), str(threads), str(n_learn), str(n_tok), home]
    pre = None
    if cgroup:

        def pre() -> None:  # join the cgroup before exec
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    stats = os.path.join(home, ".llama")
    for f in os.listdir(stats) if os.path.isdir(stats) else []:  # every mode learns from scratch
        os.unlink(os.path.join(stats, f))
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_cgroup(limit: int) -> tuple[str | None, str]:
    v1 = "/sys/fs/cgroup/memory"
    try:
        base = v1
        with open("/proc/self/cgroup") as f:
            for line in f:
                parts = line.strip().split(":")
                if parts[1] == "memory":
                    base = v1 + parts[2]
        d = os.path.join(base, f"dsv4bench{os.getpid()}")
        if os.path.isdir(v1):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
            return d, ""
        d = f"/sys/fs/cgroup/dsv4bench{os.getpid()}"
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "memory.max"), "w") as f:
            f.write(str(limit))
        return d, ""
    except OSError as e:
        return None, f"no writable memory cgroup ({e.strerror})"


def fmt_b(n: int | None) -> str:
    return "-" if n is None or n < 0 else f"{n / 2**20:8.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--learn", type=int, default=512)
    ap.add_argument("--limit-mib", type=int, default=900)
    a = ap.parse_args()
    t = time.perf_counter()
    path = model_path()
    with load_model(path) as m:
        total = m.n_bytes
        experts = sum(x.nbytes for n, x in m.tensors.items() if n.endswith("_exps.weight"))
    print(
        f"model: {PARAMS.n_layer} layers, {PARAMS.n_expert} experts top-{PARAMS.n_expert_used}, q8xq5, "
        f"{total / 2**30:.2f} GiB ({experts / 2**30:.2f} GiB experts), skewed routing; ready in "
        f"{time.perf_counter() - t:.0f} s; {a.threads} threads, learning prefill {a.learn} tokens, decode {a.tokens}"
    )
    home = os.path.join(os.path.dirname(path), "home")
    rows = []
    for name, kw in MODES.items():
        rows.append((name, run_mode(path, kw, a.threads, a.learn, a.tokens, home, None)))
    print("\nmemory plentiful")
    print(f"{'mode':16s} {'locked':>12s} {'resident':>12s} {'hit rate':>9s} {'tok/s':>7s}  hot per layer")
    for name, r in rows:
        if "error" in r:
            print(f"{name:16s} error: {r['error']}")
            continue
        hit = "-" if r["hit"] is None else f"{100 * r['hit']:8.1f}%"
        print(f"{name:16s} {fmt_b(r['locked']):>12s} {fmt_b(r['resident']):>12s} {hit:>9s} {r['tps']:7.2f}  {r['hot']}")

    limit = a.limit_mib * 2**20
    cg, why = make_cgroup(limit)
    print(f"\nmemory short: cgroup limit {a.limit_mib} MiB for a {total / 2**20:.0f} MiB model")
    if cg is None:
        print(f"skipped: {why}")
        return
    try:
        print(f"{'mode':16s} {'tok/s':>7s} {'major faults/token':>19s} {'hit rate':>9s}")
        for name, kw in MODES.items():
            if name == "auto":
                continue  # unbounded auto wants more than the limit; the budgeted row is the meaningful one
            evict(path)
            r = run_mode(path, kw, a.threads, a.learn, a.tokens, home, cg)
            if "error" in r:
                print(f"{name:16s} error: {r['error']}")
                continue
            hit = "-" if r["hit"] is None else f"{100 * r['hit']:8.1f}%"
            print(f"{name:16s} {r['tps']:7.2f} {r['majflt_per_tok']:19.1f} {hit:>9s}")
    finally:
        os.rmdir(cg)


if __name__ == "__main__":
    main()
