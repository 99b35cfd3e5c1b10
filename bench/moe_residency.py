"""MoE expert residency and routing-aware prefetch on a model larger than the memory it gets, side by side with
llama.cpp (llama-cpp-python 0.3.36, tools/oracle/) on the same file under the same limit.

The model (written once to ~/.cache/llama-dsv4/bench/): the speed benchmark's medium shape (8 layers of every kind,
n_embd 1024, 128 experts top-6, 2 hash-routed layers, q8xq5: Q5_K experts, 1.5 GB), with routing made like
DeepSeek V4 Flash's as measured on real text: a mild per-layer popularity law through the router bias and the hash
tables (a static top-N of a layer's experts covers roughly as much of its own routing as the real model's does at
the same share of experts), and temporal locality from the token stream: tokens come from "topics" (a few dozen
tokens each) that change every ~24 tokens, as a text moves between subjects.

Part 1, policies on routing traces (no timing): per layer, the share of routed experts a set of N experts holds
when it is a static hot set learned on another text, a static set chosen on the same text (the best any static
set can do), an LRU of N (what the page cache approximates), and a decayed-count set (our auto mode's ranking,
learned as it goes). Printed for this model and for the skewed synthetic model of the earlier benchmark.

Part 2, decode tokens/s in a memory cgroup limited to model/R bytes for each R of --ratios (and without a limit),
the model's pages evicted from the page cache before every run (posix_fadvise DONTNEED), each run in its own
process and cgroup, --runs runs per cell, the modes taking turns (median, min-max): plain mmap (moe_prefetch=False),
moe_prefetch=True, the default (moe_prefetch="auto": on where the model is larger than 90 % of the limit), expert
residency (auto with a budget of half the memory the limit leaves to experts), residency with prefetch, and
llama.cpp on the same file
(llama-cpp-python 0.3.36 with use_extra_bufts off, so that its weights stay mapped as ours: with the CPU repack
they would be copied into anonymous memory, which a cgroup smaller than the model cannot hold).
Part 3: the same at one ratio while another process in the same cgroup streams a large file (competing pressure,
where locked experts keep their pages).

    python bench/moe_residency.py [--oracle-python $(tools/oracle/setup.sh)] [--threads 2] [--runs 3]
        [--ratios 1.3,1.4,1.7,2.5] [--tokens 48] [--parts 1,2,3]

Needs a writable memory cgroup (v1 or v2; root in most containers) for parts 2 and 3, which say so otherwise.
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
from collections import OrderedDict
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import MEDIUM

from llama_dsv4.model.loader import load_model
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import Init, write_model

PARAMS = DSV4Params(**MEDIUM)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llama-dsv4", "bench")
# router bias = scale * log(popularity), popularity ~ 1/rank^1.1 in a per-layer order of the experts
MODELS = {"realistic": 0.065, "skewed": 0.25}
TOPIC_TOKENS, TOPIC_MEAN_LEN, N_TOPICS = 32, 24, 64


def model_path(kind: str) -> str:
    scale = MODELS[kind]
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"moe-skewed{scale}-128x6-q8xq5.gguf")
    if not os.path.exists(path):
        tmp = path + ".part"
        write_model(tmp, PARAMS, dtype="q8xq5", init=Init(router_scale=0.3), name=f"moe residency bench {kind}")
        skew(tmp, scale)
        os.replace(tmp, path)
    return path


def skew(path: str, scale: float) -> None:
    """Expert popularity ~ 1/rank^1.1 in a per-layer order: the router bias of learned layers (scale * log of it),
    and each token's row of the hash tables drawn from the same law."""
    rng = np.random.default_rng(11)
    E, k = PARAMS.n_expert, PARAMS.n_expert_used
    pop = 1.0 / np.arange(1, E + 1) ** 1.1
    with load_model(path) as m:
        table = {n: (t.offset, t.nbytes) for n, t in m.tensors.items()}
    with open(path, "r+b") as f:
        for il in range(PARAMS.n_layer):
            perm = rng.permutation(E)
            if il < PARAMS.hash_layer_count:
                p = pop ** (4 * scale) / (pop ** (4 * scale)).sum()  # hash rows: a tilt that grows with scale
                rows = np.stack([perm[rng.choice(E, k, replace=False, p=p)] for _ in range(PARAMS.n_vocab)])
                f.seek(table[f"blk.{il}.ffn_gate_tid2eid.weight"][0])
                f.write(rows.astype("<i4").tobytes())
            else:
                bias = np.empty(E, np.float32)
                bias[perm] = scale * np.log(pop / pop.max())
                f.seek(table[f"blk.{il}.exp_probs_b.bias"][0])
                f.write(bias.astype("<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())


def token_stream(text: int, n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """A "text": tokens with temporal locality, runs (geometric, mean TOPIC_MEAN_LEN) drawn from one of the text's
    N_TOPICS topics of TOPIC_TOKENS tokens each, so subjects recur within a text and differ between texts."""
    topics = np.random.default_rng(1000 + text).integers(3, n_vocab, (N_TOPICS, TOPIC_TOKENS))
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        t = topics[rng.integers(N_TOPICS)]
        out += [int(x) for x in rng.choice(t, int(rng.geometric(1 / TOPIC_MEAN_LEN)))]
    return out[:n]


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- part 1: policies


def routing_trace(path: str, tokens: list[int]) -> np.ndarray:
    """[n_layer, n_tokens, k] experts each token was routed to (the engine's route sink)."""
    from llama_dsv4 import Llama

    llm = Llama(model_path=path, n_ctx=len(tokens) + 8, n_batch=256, n_ubatch=256, n_threads=2, verbose=False)
    parts: list[np.ndarray] = []
    llm._ctx.route_sink = lambda routes, tokens=None: parts.append(np.array(routes))  # bench only: the engine's sink
    llm.eval(tokens)
    llm.close()
    return np.concatenate(parts, axis=1)


def hit_rates(train: np.ndarray, test: np.ndarray, n: int, E: int = PARAMS.n_expert) -> dict[str, float]:
    """Share of test's routed experts held by a set of n of the E experts per layer, for each policy."""
    L, T, _ = test.shape
    hits = {"static, other text": 0, "static, same text": 0, "LRU": 0, "decayed count": 0}
    for il in range(L):
        other = np.argsort(-np.bincount(train[il].ravel(), minlength=E), kind="stable")[:n]
        same = np.argsort(-np.bincount(test[il].ravel(), minlength=E), kind="stable")[:n]
        hits["static, other text"] += int(np.isin(test[il], other).sum())
        hits["static, same text"] += int(np.isin(test[il], same).sum())
        lru: OrderedDict[int, None] = OrderedDict()
        decayed = np.bincount(train[il].ravel(), minlength=E).astype(np.float64)
        half = 0.5 ** (1 / 16384)  # the auto mode's half-life, in tokens
        hot: set[int] = set()
        for t in range(T):
            if t % 64 == 0:  # as the auto mode, which updates its hot set now and then (every 1,024 tokens)
                hot = set(np.argsort(-decayed, kind="stable")[:n].tolist())
            for e in test[il, t].tolist():
                hits["LRU"] += e in lru
                hits["decayed count"] += e in hot
                lru[e] = None
                lru.move_to_end(e)
                if len(lru) > n:
                    lru.popitem(last=False)
            decayed *= half
            decayed[test[il, t]] += 1
    return {p: h / test.size for p, h in hits.items()}


def print_rates(title: str, train: np.ndarray, test: np.ndarray, sizes: list[int], E: int) -> None:
    print(f"\n{title}")
    print(f"{'policy':22s}" + "".join(f" {f'N={n}':>8s}" for n in sizes))
    rates = [hit_rates(train, test, n, E) for n in sizes]
    for p in rates[0]:
        print(f"{p:22s}" + "".join(f" {100 * r[p]:7.1f}%" for r in rates))


def demo_texts() -> tuple[str, str]:
    """Two English texts that ship with Python: the documentation of two unrelated modules."""
    import argparse as one
    import pydoc
    import smtplib as two

    return pydoc.render_doc(one, renderer=pydoc.plaintext), pydoc.render_doc(two, renderer=pydoc.plaintext)


def part_policies() -> None:
    print("part 1: the share of routed experts a set of N per layer holds (hit rate), on routing traces")
    for kind in MODELS:
        path = model_path(kind)
        train = routing_trace(path, token_stream(1, 1024, PARAMS.n_vocab))
        test = routing_trace(path, token_stream(2, 1024, PARAMS.n_vocab))
        title = (
            f"{kind} routing ({os.path.basename(path)}): learned on 1024 tokens of one text, tested on 1024 of another"
        )
        print_rates(title, train, test, [4, 8, 16, 32, 64], PARAMS.n_expert)
    from llama_dsv4 import Llama
    from llama_dsv4.demo import demo_model_path

    path = demo_model_path()
    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    one, two = (llm.tokenize(t.encode(), add_bos=False)[:1024] for t in demo_texts())
    E = llm._model.params.n_expert
    llm.close()
    title = "the trained demo model (8 experts top-2): learned on argparse's documentation, tested on smtplib's"
    print_rates(title, routing_trace(path, one), routing_trace(path, two), [2, 4, 6], E)
    print(
        "\nDeepSeek V4 Flash on real text (docs/moe-residency.md, 'Real routing'): a static top-N of 256 on the same "
        "text holds 36 % (N=8), 47 % (16), 59 % (32), 71 % (64), that is N/E = 1/32 .. 1/4 as N = 4 .. 32 here"
    )


# ---------------------------------------------------------------------------------------------- part 2: speed

CHILD = r"""
import json, os, resource, sys, time
engine, path, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if engine == "ours":
    import llama_dsv4 as llama_cpp
else:
    import llama_cpp
    _defaults = llama_cpp.llama_cpp.llama_model_default_params
    def _mapped():  # no CPU repack: the weights stay in the mapped file, as ours
        p = _defaults()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = _mapped
learn, decode, kw = cfg["learn"], cfg["decode"], cfg["kw"]
llm = llama_cpp.Llama(model_path=path, n_ctx=len(learn) + len(decode) + 16, n_batch=64, n_ubatch=64,
                      n_threads=cfg["threads"], n_threads_batch=cfg["threads"], verbose=False, **kw)
moe = getattr(llm, "_moe", None)
if moe is not None:
    moe.config.interval = 128  # hot-set updates during the learning prefill, then one with all of it
llm.eval(learn)
if moe is not None:
    moe._update()
ru = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
for x in decode:
    llm.eval([x])
dt = time.perf_counter() - t
ru2 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tps": len(decode) / dt, "majflt": (ru2.ru_majflt - ru.ru_majflt) / len(decode)}))
"""


class Cgroup:
    """A memory cgroup of its own (v1 or v2) with a limit, joined by the children; removed on exit."""

    def __init__(self, limit: int | None) -> None:
        self.dir: str | None = None
        if limit is None:
            return
        v1 = "/sys/fs/cgroup/memory"
        if os.path.isdir(v1):
            base = v1
            with open("/proc/self/cgroup") as f:
                for line in f:
                    parts = line.strip().split(":", 2)
                    if parts[1] == "memory":
                        base = v1 + parts[2]
            self.dir, knob = (
                os.path.join(base, f"dsv4bench{os.getpid()}-{time.monotonic_ns()}"),
                "memory.limit_in_bytes",
            )
        else:
            self.dir, knob = f"/sys/fs/cgroup/dsv4bench{os.getpid()}-{time.monotonic_ns()}", "memory.max"
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, knob), "w") as f:
            f.write(str(limit))

    def join(self) -> None:  # in the child, before exec
        if self.dir is not None:
            with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            for _ in range(50):  # the children are gone; the kernel may take a moment to let the group go
                try:
                    os.rmdir(self.dir)
                    return
                except OSError:
                    time.sleep(0.1)


def cgroup_available() -> str:
    try:
        with Cgroup(1 << 30):
            return ""
    except OSError as e:
        return f"no writable memory cgroup ({e.strerror})"


def run(engine: str, python: str, path: str, cfg: dict[str, Any], limit: int | None, stream: str | None) -> dict:
    """One child in a fresh cgroup (with `stream`: beside a process reading that file over and over)."""
    evict(path)
    with Cgroup(limit) as cg, tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HOME=home)  # statistics files start empty
        reader = None
        if stream is not None:
            evict(stream)
            loop = "import sys\nwhile True:\n    f = open(sys.argv[1], 'rb', 0)\n    while f.read(1 << 22): pass\n"
            reader = subprocess.Popen([sys.executable, "-c", loop, stream], preexec_fn=cg.join)
        try:
            r = subprocess.run([python, "-c", CHILD, engine, path, json.dumps(cfg)], capture_output=True, text=True,
                               preexec_fn=cg.join, cwd=home, env=env, timeout=3600)  # fmt: skip
        finally:
            if reader is not None:
                reader.kill()
                reader.wait()
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


MODES = [
    "off (plain mmap)",
    "prefetch",
    "default (prefetch auto)",
    "residency (auto, half the room)",
    "residency + prefetch",
    "llama.cpp",
]
BEST = ["default (prefetch auto)", "residency + prefetch"]


def mode_kw(mode: str, budget_mib: int) -> tuple[str, dict[str, Any]]:
    """(engine, Llama keywords) of a mode; the residency budget is half of what the limit leaves to experts."""
    res = {"moe_hot_count": "auto", "moe_hot_budget_mib": budget_mib}
    return {
        "off (plain mmap)": ("ours", {"moe_prefetch": False}),
        "prefetch": ("ours", {"moe_prefetch": True}),
        "default (prefetch auto)": ("ours", {}),
        "residency (auto, half the room)": ("ours", {**res, "moe_prefetch": False}),
        "residency + prefetch": ("ours", {**res, "moe_prefetch": True}),
        "llama.cpp": ("reference", {}),
    }[mode]


def median_tps(rs: list[dict]) -> float | None:
    ok = [r["tps"] for r in rs if "error" not in r]
    return statistics.median(ok) if ok else None


def cell(rs: list[dict]) -> str:
    ok = [r["tps"] for r in rs if "error" not in r]
    return f"{statistics.median(ok):7.2f} ({min(ok):6.2f}-{max(ok):6.2f})" if ok else "error"


def stream_file() -> str:
    path = os.path.join(CACHE, "stream-2g.bin")
    if not os.path.exists(path) or os.path.getsize(path) != 2 << 30:
        with open(path + ".part", "wb") as f:
            for _ in range(512):
                f.write(os.urandom(4 << 20))
        os.replace(path + ".part", path)
    return path


def part_speed(a: argparse.Namespace, competing: bool) -> None:
    path = model_path("realistic")
    size = os.path.getsize(path)
    with load_model(path) as m:
        experts = sum(t.nbytes for n, t in m.tensors.items() if n.endswith("_exps.weight"))
    text = token_stream(3, a.learn + max(a.tokens, a.tokens_plentiful), PARAMS.n_vocab)  # decoding goes on with it
    ratios = [a.competing_ratio] if competing else [None] + [float(x) for x in a.ratios.split(",") if x]
    stream = stream_file() if competing else None
    modes = MODES if a.oracle_python else MODES[:-1]
    title = "part 3: competing memory pressure" if competing else "part 2: decode tokens/s"
    print(f"\n{title}; {os.path.basename(path)}: {size / 2**20:.0f} MiB ({experts / 2**20:.0f} MiB experts); "
          f"{a.threads} threads; a learning prefill of {a.learn} tokens, then {a.tokens} decode steps "
          f"({a.tokens_plentiful} without a limit); {a.runs} runs per cell, the modes taking turns; median (min-max)"
          + ("; another process in the cgroup reads a 2 GiB file over and over" if competing else ""))  # fmt: skip
    table: dict[str, dict[Any, list[dict]]] = {m: {r: [] for r in ratios} for m in modes}
    for r_ in ratios:
        limit = None if r_ is None else int(size / r_)
        budget = max(16, int(((limit or size) - (size - experts)) / 2 / 2**20))
        n = a.tokens if r_ is not None else a.tokens_plentiful
        cfg = {"threads": a.threads, "learn": text[: a.learn], "decode": text[a.learn : a.learn + n]}
        for _ in range(a.runs):
            for mode in modes:
                engine, kw = mode_kw(mode, budget)
                py = a.oracle_python if engine == "reference" else sys.executable
                r = run(engine, py, path, {**cfg, "kw": kw}, limit, stream)
                if "error" in r:
                    print(f"  {mode} at {r_}: {r['error']}")
                table[mode][r_].append(r)
    print(f"{'mode':40s}" + "".join(f" {('no limit' if r_ is None else f'model/limit {r_}'):>21s}" for r_ in ratios))
    for mode in modes:
        print(f"{mode:40s}" + "".join(f" {cell(table[mode][r_]):>21s}" for r_ in ratios))
    for best in BEST:
        for ref in ("off (plain mmap)", "llama.cpp"):
            if ref not in table:
                continue
            print(f"{best + ' / ' + ref.split(' ')[0]:40s}" + "".join(
                f" {(x / y if x and y else float('nan')):20.2f}x"
                for x, y in ([median_tps(table[best][r_]), median_tps(table[ref][r_])] for r_ in ratios)))  # fmt: skip
    last = ratios[-1]
    faults = {m: statistics.median(x["majflt"] for x in table[m][last] if "error" not in x) for m in modes}
    print("major page faults per decode step, last column: " + ", ".join(f"{m} {v:.1f}" for m, v in faults.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python", help="the reference's python (tools/oracle/setup.sh prints it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ratios", default="1.3,1.4,1.7,2.5", help="model size / memory limit, comma-separated")
    ap.add_argument("--competing-ratio", type=float, default=1.4)
    ap.add_argument("--tokens", type=int, default=48, help="decode steps per run with a memory limit")
    ap.add_argument("--tokens-plentiful", type=int, default=256, help="decode steps per run without a limit")
    ap.add_argument("--learn", type=int, default=256, help="tokens of the learning prefill before decoding")
    ap.add_argument("--parts", default="1,2,3")
    a = ap.parse_args()
    parts = {int(x) for x in a.parts.split(",")}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs")
    if 1 in parts:
        part_policies()
    why = cgroup_available() if parts & {2, 3} else ""
    if why:
        print(f"\nparts 2 and 3 skipped: {why}")
        return
    if 2 in parts:
        part_speed(a, competing=False)
    if 3 in parts:
        part_speed(a, competing=True)


if __name__ == "__main__":
    main()
