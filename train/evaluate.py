"""Evaluate a training run and export it: `python -m train.evaluate --run RUN --data DIR [--n 50]`.

Writes RUN/model-{f32,f16,q8xq5}.gguf with our writer (the vocabulary and the DeepSeek V4 chat template included),
then prints a table: held-out perplexity of the main head and of the MTP head (next-next token) and MTP top-1
accuracy (the PyTorch network on held-out text and held-out conversations), and the skills on held-out problems
run by our engine (llama_dsv4.Llama, greedy, chat completions as a user calls them: tools with tool_choice auto,
no grammar): arithmetic accuracy per operation, tool calls with the right name and arguments, JSON answers that
parse. The figures also go to RUN/eval.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from llama_dsv4.engine.context import Context

from llama_dsv4 import Llama, _ggml
from llama_dsv4.model.loader import load_model
from llama_dsv4.tokenizer import DSV4Tokenizer

from . import data as D
from .export import export
from .model import DSV4, count_params
from .train import demo_params


def load_run(run: str, data_dir: str) -> tuple[DSV4, Any]:
    with open(os.path.join(data_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = D.vocab_from_json(json.load(f))
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    shape = {k: cfg[k] for k in ("n_head", "head_dim", "indexer_head_dim") if k in cfg}
    net = DSV4(demo_params(vocab.n_tokens, **shape), max_pos=1024)
    net.load_state_dict(torch.load(os.path.join(run, "model.pt")), strict=False)
    return net.eval(), vocab


@torch.no_grad()
def perplexity(net: DSV4, docs: list[np.ndarray], seq: int) -> dict[str, float]:
    """Main and MTP (next-next token) perplexity and top-1 accuracy over windows of `seq` tokens."""
    nll = [0.0, 0.0]
    hits = [0, 0]
    n = [0, 0]
    for d in docs:
        for s in range(0, max(1, len(d) - 2), seq):
            w = torch.from_numpy(d[s : s + seq].astype(np.int64))[None]
            if w.shape[1] < 3:
                continue
            logits, mtp, _ = net(w, mtp=True)
            for i, (lg, tgt) in enumerate(((logits[0, :-1], w[0, 1:]), (mtp[0, :-1], w[0, 2:]))):
                nll[i] += float(F.cross_entropy(lg, tgt, reduction="sum"))
                hits[i] += int((lg.argmax(-1) == tgt).sum())
                n[i] += len(tgt)
    return {
        "ppl_main": math.exp(nll[0] / n[0]),
        "ppl_mtp": math.exp(nll[1] / n[1]),
        "top1_main": hits[0] / n[0],
        "top1_mtp": hits[1] / n[1],
        "tokens": n[0],
    }


def engine_perplexity(path: str, tokens: np.ndarray, seq: int) -> float:
    """Perplexity of the main head as our engine computes it from a GGUF, windows of `seq` tokens."""
    nll, n = 0.0, 0
    with load_model(path) as m:
        ctx = Context(m, seq, n_ubatch=seq, backends=_ggml.Backends("cpu", 2))
        for s in range(0, len(tokens) - 1, seq):
            w = tokens[s : s + seq].astype(np.int32)
            if len(w) < 2:
                continue
            ctx.reset()
            lg = torch.from_numpy(np.asarray(ctx.eval(w, all_logits=True), np.float32))
            nll += float(F.cross_entropy(lg[:-1], torch.from_numpy(w[1:].astype(np.int64)), reduction="sum"))
            n += len(w) - 1
        del ctx
    return math.exp(nll / n)


def routing(net: DSV4, tokens: np.ndarray, seq: int, hot: int) -> dict[str, Any]:
    """Per routed layer on held-out text: expert usage (share of the busiest / the idlest expert), and the share of
    routed expert uses a static hot set of the `hot` most used experts covers versus an LRU cache of `hot` experts
    (hits while decoding token by token)."""
    net.routes = {}
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, seq):
            net(torch.from_numpy(tokens[s : s + seq].astype(np.int64))[None])
    out = {}
    for il, chunks in sorted(net.routes.items()):
        if net.p.is_hash_layer(il):
            continue
        sel = torch.cat(chunks).numpy()
        use = np.bincount(sel.reshape(-1), minlength=net.p.n_expert) / sel.size
        top = set(np.argsort(-use)[:hot].tolist())
        static = float(np.isin(sel, list(top)).mean())
        lru: list[int] = []
        hits = 0
        for row in sel:
            for e in row.tolist():
                if e in lru:
                    hits += 1
                    lru.remove(e)
                lru.append(e)
                if len(lru) > hot:
                    lru.pop(0)
        out[f"layer {il}"] = {"max_share": float(use.max()), "min_share": float(use.min()),
                              "static_hot": static, "lru": hits / sel.size}  # fmt: skip
    net.routes = None
    return out


def auto_residency(path: str, tokens: np.ndarray, seq: int) -> dict[str, Any]:
    """What `moe_hot_count="auto"` chooses on this model after reading the held-out text: the hot experts per
    routed layer (of n_expert) and the online hit rate of those hot sets."""
    llm = Llama(model_path=path, n_ctx=seq, n_threads=2, moe_hot_count="auto", verbose=False)
    for s in range(0, len(tokens) - 1, seq):
        llm.reset()
        llm.eval(tokens[s : s + seq].tolist())
    st = llm.moe_stats() or {}
    llm.close()
    return {"hot_per_layer": st.get("hot_per_layer"), "hit_rate": st.get("hit_rate")}


def last_int(text: str) -> int | None:
    m = re.findall(r"-?\d+", text.replace(",", ""))
    return int(m[-1]) if m else None


def fresh_places(data_dir: str, vocab: Any, n: int = 16, seed: int = 99) -> list[str]:
    """n invented places (the recipe's own kind of name) that appear nowhere in the training stream, with or
    without a leading space: names the model can only write by copying them from the request."""
    stream = np.fromfile(os.path.join(data_dir, "train.bin"), np.uint16)
    tk = DSV4Tokenizer(vocab)
    rng, out = random.Random(seed), []

    def seen(ids: list[int]) -> bool:
        hit = np.ones(len(stream) - len(ids) + 1, bool)
        for k, t in enumerate(ids):
            hit &= stream[k : len(stream) - len(ids) + 1 + k] == t
        return bool(hit.any())

    for _ in range(1000 * n):
        if len(out) == n:
            return out
        name = D.invented_place(rng)
        if name not in out and not any(seen(tk.tokenize(x.encode(), add_bos=False)) for x in (name, " " + name)):
            out.append(name)
    raise ValueError(f"{data_dir}: found only {len(out)} of {n} invented places absent from the training stream")


def copy_probe_accuracy(path: str, probe: list[dict[str, Any]], kind: str = "city") -> tuple[int, int]:
    """train.train's copy probe on an exported file: (hits, targets) of the engine's top-1, teacher-forced, on the
    probe's items of `kind` (DATA/copy_probe.json: "city", the probe cities' tokens after their first; "currency",
    the codes in held-out conversions' calls; "sub", held-out subtractions with every digit right, counted by the
    item)."""
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    hits = n = 0
    for item in probe:
        if D.probe_kind(item) != kind:
            continue
        ids = item["ids"]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)])
        h, c = D.probe_score(kind, [bool(scores[t - 1].argmax() == ids[t]) for t in item["targets"]])
        hits, n = hits + h, n + c
    llm.close()
    return hits, n


def probe_rows(path: str, data: str) -> dict[str, tuple[int, int]]:
    """The copy probe's rows for a table of skills: each kind DATA/copy_probe.json holds."""
    with open(os.path.join(data, "copy_probe.json"), encoding="utf-8") as f:
        probe = json.load(f)
    kinds = {D.probe_kind(item) for item in probe}
    unit = {k: "items" if k in D.PROBE_WHOLE else "tokens" for k in kinds}
    return {
        f"copy probe, teacher-forced {k} {unit[k]}": copy_probe_accuracy(path, probe, k)
        for k in D.PROBE_KINDS
        if k in kinds
    }


# an arithmetic answer's budget: the longest working (train.data --subtraction borrow for a < b) and the answer are
# about 150 tokens; the plain working's are under 100 (until 2026-12-07 the budget was 120)
ARITH_MAX_TOKENS = 200
APART = ("probe", "fresh")  # weather requests reported apart from the scored held-out ones


def skills(path: str, held: dict[str, list[Any]], n: int, fresh: list[str] | None = None) -> dict[str, Any]:
    """Held-out skills through llama_dsv4.Llama, greedy. Tool requests: the held-out ones (scored), then weather in
    PROBE_CITIES and in `fresh` invented places (APART: copying names the model never saw). `misses` lists the
    arithmetic and tool requests it got wrong, with what it wrote."""
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
    out: dict[str, Any] = {}
    rng = random.Random(0)
    per_op: dict[str, list[int]] = {"+": [], "-": [], "*": []}
    examples: dict[str, str] = {}
    misses: list[str] = []
    for a, op, b in held["arith"][:n]:
        msgs, ans = D.arithmetic_messages(a, op, b, rng)
        r = llm.create_chat_completion(messages=msgs[:1], temperature=0.0, max_tokens=ARITH_MAX_TOKENS)
        text = r["choices"][0]["message"]["content"] or ""
        per_op[op].append(int(last_int(text) == ans))
        if not per_op[op][-1]:
            misses.append(f"{msgs[0]['content']} -> {text!r}")
        examples.setdefault(f"arith {op}", f"{msgs[0]['content']} -> {text!r}")
    for op, v in per_op.items():
        out[f"arith {op}"] = (sum(v), len(v))
    tool_ok, tool_kind = [], []
    probes = [("probe", city) for city in D.PROBE_CITIES]  # weather in more real cities it never saw, reported apart
    probes += [("fresh", name) for name in fresh or []]
    for prob in [*held["tool"][:n], *probes]:
        prob = tuple(prob)
        msgs, call = D.tool_messages(("weather", prob[1]) if prob[0] in APART else prob, rng)
        r = llm.create_chat_completion(messages=msgs[:1], tools=D.TOOLS, tool_choice="auto", temperature=0.0,
                                       max_tokens=120)  # fmt: skip
        m = r["choices"][0]["message"]
        calls = m.get("tool_calls") or []
        ok = False
        if calls:
            f = calls[0]["function"]
            try:
                ok = f["name"] == call["name"] and json.loads(f["arguments"]) == call["arguments"]
            except ValueError:
                ok = False
        tool_ok.append(int(ok))
        if not ok:
            misses.append(f"{prob[0]}: {msgs[0]['content']} -> {calls[:1] or m.get('content')!r}")
        tool_kind.append(prob[0])
        examples.setdefault("tool", f"{msgs[0]['content']} -> {calls[:1] or m.get('content')!r}")
    scored = [ok for ok, k in zip(tool_ok, tool_kind, strict=True) if k not in APART]
    out["tool call"] = (sum(scored), len(scored))
    for kind in ("weather", "currency", "probe", "fresh"):  # held-out weather requests name real cities it never saw
        mine = [ok for ok, k in zip(tool_ok, tool_kind, strict=True) if k == kind]
        out[f"tool call {kind}"] = (sum(mine), len(mine))
    parsed, exact = [], []
    for prob in held["json"][:n]:
        prob = (prob[0], tuple(tuple(x) for x in prob[1]))
        msgs, value = D.json_messages(prob)
        r = llm.create_chat_completion(messages=msgs[:1], temperature=0.0, max_tokens=120)
        text = r["choices"][0]["message"]["content"] or ""
        try:
            got = json.loads(text)
            parsed.append(1)
            exact.append(int(got == value))
        except ValueError:
            parsed.append(0)
            exact.append(0)
        examples.setdefault("json", f"{msgs[0]['content']} -> {text!r}")
    out["json parses"] = (sum(parsed), len(parsed))
    out["json exact"] = (sum(exact), len(exact))
    out["examples"] = examples
    out["misses"] = misses
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="the training run (exported and evaluated whole)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--skills-only", metavar="GGUF", help="only the skills, on this file (the shipped demo model)")
    ap.add_argument("--n", type=int, default=50, help="held-out problems per skill")
    ap.add_argument("--variant", default="q8xq5", help="the exported variant the skills are measured on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--earlier", nargs="*", default=[], help="earlier phases' runs (their tokens and time count too)")
    ap.add_argument("--misses", action="store_true", help="print every arithmetic and tool request it got wrong")
    a = ap.parse_args()
    if a.skills_only:
        with open(os.path.join(a.data, "vocab.json"), encoding="utf-8") as f:
            fresh = fresh_places(a.data, D.vocab_from_json(json.load(f)))
        with open(os.path.join(a.data, "heldout.json")) as f:
            sk = skills(a.skills_only, json.load(f), a.n, fresh)
        sk.update(probe_rows(a.skills_only, a.data))
        for k, v in sk.items():
            if k != "misses":
                print(f"| {k} | {v} |" if k == "examples" else f"| {k} | {v[0]}/{v[1]} = {v[0] / max(1, v[1]):.0%} |")
        for line in sk["misses"] if a.misses else []:
            print(f"miss {line}")
        return
    if not a.run:
        ap.error("--run is required (or --skills-only)")
    torch.set_num_threads(a.threads)
    net, vocab = load_run(a.run, a.data)
    with open(os.path.join(a.run, "config.json")) as f:
        cfg = json.load(f)
    done = {}
    if os.path.exists(os.path.join(a.run, "done.json")):
        with open(os.path.join(a.run, "done.json")) as f:
            done = json.load(f)
    total, active = count_params(net.p)
    seconds, tokens = float(done.get("seconds", cfg["minutes"] * 60)), int(done.get("tokens") or 0)
    for run in a.earlier:  # an earlier phase (stopped by --stop-minutes or by hand): its last logged row
        with open(os.path.join(run, "loss.csv"), newline="") as f:
            last = list(csv.DictReader(f))[-1]
        seconds, tokens = seconds + float(last["seconds"]), tokens + int(last["tokens"])
    minutes = seconds / 60
    name = f"llama-dsv4 demo: a {total / 1e6:.1f}M-parameter deepseek4 trained {minutes:.0f} minutes on a 2-core CPU"
    paths = {}
    for dt in ("f32", "f16", "q8xq5"):
        paths[dt] = export(net, os.path.join(a.run, f"model-{dt}.gguf"), dtype=dt, vocab=vocab, name=name)
    tok_held = np.fromfile(os.path.join(a.data, "heldout_text.bin"), np.uint16)
    with open(os.path.join(a.data, "heldout.json")) as f:
        held = json.load(f)
    tk = DSV4Tokenizer(vocab)
    rng = random.Random(1)
    convs = []
    subtraction = D.data_format(a.data)["subtraction"]
    for p in held["arith"][: a.n]:
        convs.append(D.render_chat(D.arithmetic_messages(*p, rng, subtraction)[0], thinking=True))
    for p in held["tool"][: a.n]:
        convs.append(D.render_chat(D.tool_messages(tuple(p), rng)[0], tools=D.TOOLS))
    conv_docs = [np.array(tk.tokenize(c.encode(), add_bos=False, special=True)) for c in convs]
    t0 = time.time()
    ppl_text = perplexity(net, [tok_held], cfg["seq"])
    ppl_conv = perplexity(net, conv_docs, 1024)
    routes = routing(net, tok_held, cfg["seq"], hot=4)
    ppl_engine = {dt: engine_perplexity(p, tok_held, cfg["seq"]) for dt, p in paths.items()}
    auto = auto_residency(paths[a.variant], tok_held, cfg["seq"])
    sk = skills(paths[a.variant], held, a.n, fresh_places(a.data, vocab))
    sk.update(probe_rows(paths[a.variant], a.data))
    res = {
        "params_total": total,
        "params_active": active,
        "tokens_seen": tokens,
        "train_minutes": round(minutes, 1),
        "text": ppl_text,
        "conversations": ppl_conv,
        "engine_ppl_text": ppl_engine,
        "routing": routes,
        "moe_hot_count_auto": auto,
        "skills_variant": a.variant,
        "skills": sk,
        "file_bytes": {k: os.path.getsize(v) for k, v in paths.items()},
        "eval_seconds": round(time.time() - t0),
    }
    with open(os.path.join(a.run, "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"| {name} | |")
    print("|---|---|")
    print(f"| parameters (total / active per token, MTP layer included) | {total:,} / {active:,} |")
    print(f"| tokens seen / wall time | {res['tokens_seen']} / {minutes:.1f} min |")
    for label, r in (("held-out text", ppl_text), ("held-out conversations", ppl_conv)):
        print(f"| {label}: perplexity main / MTP ({r['tokens']} tokens) | {r['ppl_main']:.2f} / {r['ppl_mtp']:.2f} |")
        print(f"| {label}: top-1 main / MTP next-next token | {r['top1_main']:.3f} / {r['top1_mtp']:.3f} |")
    print(f"| held-out text: perplexity of our engine on f32 / f16 / q8xq5 | "
          f"{' / '.join(f'{v:.2f}' for v in ppl_engine.values())} |")  # fmt: skip
    for k, v in routes.items():
        print(f"| routing {k}: busiest / idlest expert share; 4 hot of 8 static / LRU coverage | "
              f"{v['max_share']:.1%} / {v['min_share']:.1%}; {v['static_hot']:.1%} / {v['lru']:.1%} |")  # fmt: skip
    print(f"| moe_hot_count=\"auto\" on held-out text: hot experts per layer (of {net.p.n_expert}); hit rate | "
          f"{auto['hot_per_layer']}; {auto['hit_rate']:.1%} |")  # fmt: skip
    for k, v in sk.items():
        if k not in ("examples", "misses"):
            print(f"| {k} ({a.variant}, held out) | {v[0]}/{v[1]} = {v[0] / max(1, v[1]):.0%} |")
    for k, v in res["file_bytes"].items():
        print(f"| file size {k} | {v / 1e6:.1f} MB |")
    for k, v in sk["examples"].items():
        print(f"example {k}: {v}")
    for line in sk["misses"] if a.misses else []:
        print(f"miss {line}")


if __name__ == "__main__":
    main()
