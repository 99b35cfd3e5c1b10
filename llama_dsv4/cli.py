"""`llama-dsv4`: the command-line entry point.

Today it opens a model (the embedded demo model when none is given), validates and maps it, prints what it holds,
and decodes a few tokens greedily from the BOS token (ids; text needs the tokenizer, which comes with the API).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from . import __version__, _ggml
from .demo import DEMO_NAME, demo_model_path
from .engine.context import Context
from .model.loader import ModelFile, load_model


def _decode(model: ModelFile, backends: _ggml.Backends, n: int) -> str:
    v = model.vocab
    start = v.bos_id if v is not None and v.bos_id is not None else 0
    ctx = Context(model, n + 1, n_ubatch=64, backends=backends)
    last = ctx.eval([start])[0]
    ids = []
    t0 = time.perf_counter()
    for _ in range(n):
        ids.append(int(last.argmax()))
        last = ctx.eval([ids[-1]])[0]
    dt = time.perf_counter() - t0
    state = ctx.state_bytes
    del ctx
    return f"greedy      {ids} ({n / dt:.1f} tokens/s; context state {state / 2**10:.0f} KiB)"


def _summary(path: str, device: str, threads: int, n_predict: int) -> str:
    t0 = time.perf_counter()
    model = load_model(path)
    backends = _ggml.Backends(device, threads)
    weights = model.weights(backends)
    dt = time.perf_counter() - t0
    p, v = model.params, model.vocab
    kinds = collections.Counter(
        {0: "sliding-window", 4: "CSA (ratio 4 + indexer)", 128: "HCA (ratio 128)"}[p.ratio(i)]
        for i in range(p.n_layer)
    )
    types = collections.Counter(_ggml.type_traits(t.type)[0] for t in model.tensors.values())
    name = model.metadata.get("general.name", "?")
    lines = [
        f"model       {model.path}" + (f" (+{len(model.paths) - 1} shards)" if len(model.paths) > 1 else ""),
        f"name        {name}",
        f"arch        deepseek4: {p.n_layer} layers ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"{p.hash_layer_count} hash-routed, {p.n_nextn} MTP",
        f"sizes       n_embd {p.n_embd}, {p.n_head} heads x {p.head_dim} (rope {p.rope_dim}), "
        f"{p.n_expert} experts top-{p.n_expert_used} x {p.expert_ff}, window {p.sliding_window}, "
        f"context {p.n_ctx_train}",
        f"vocab       {v.n_tokens if v else p.n_vocab} tokens"
        + (f", pre-tokenizer {v.pre}" if v else " (no tokenizer)"),
        f"tensors     {len(model.tensors)} ({', '.join(f'{n} {t}' for t, n in types.most_common())}), "
        f"{model.n_bytes / 2**20:.1f} MiB",
        f"backends    {', '.join(backends.names)}, {backends.threads} threads; weights "
        f"{'mapped zero-copy' if weights.zero_copy else 'copied'} on {weights.device}",
        f"loaded in   {dt * 1e3:.1f} ms",
    ]
    if name == DEMO_NAME:
        lines.insert(0, "NOTE: the embedded demo model has RANDOM weights; pass -m MODEL.gguf for a real model.")
    if n_predict > 0:
        lines.append(_decode(model, backends, n_predict))
    del weights
    model.close()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-dsv4", description="DeepSeek V4 (GGUF deepseek4) on ggml, from Python.")
    ap.add_argument("-m", "--model", help="a GGUF file or any shard of a split set (default: the embedded demo model)")
    ap.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    ap.add_argument("--device", default="auto", help="ggml device: auto, cpu, or a name from --list-devices")
    ap.add_argument("-n", "--n-predict", type=int, default=16, help="tokens to decode greedily (0: only load)")
    ap.add_argument("--list-devices", action="store_true", help="list the devices of this libggml build and exit")
    ap.add_argument("--version", action="version", version=f"llama-dsv4 {__version__}")
    args = ap.parse_args(argv)
    if args.list_devices:
        for d in _ggml.devices():
            print(f"{d['name']:12s} {d['type']:6s} {d['description']} ({d['memory_total'] / 2**30:.1f} GiB)")
        return 0
    try:
        path = args.model or demo_model_path()
        print(_summary(path, args.device, args.threads, args.n_predict))
    except ValueError as e:
        print(f"llama-dsv4: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
