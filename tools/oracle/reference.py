"""Reference results from llama.cpp (llama-cpp-python 0.3.36) for comparison with llama_dsv4.

Run it with the python that tools/oracle/setup.sh prints, in a process of its own: never in one that imported
llama_dsv4 (both load a libggml, of different versions, and the first one loaded wins).

  logits     MODEL.gguf (--tokens 1,2,3 | --tokens-file ids.npy | --n-tokens N [--seed S])
             [--ubatch U] [--incremental | --prefill P] [--kv-f32] [--threads T] [--ctx C] --out ref.npz
      The logits at every position: an .npz with `tokens` (int32) and `logits` (float32, one row per token).
      Tokens go in ubatches of U; --incremental sends one token per decode, --prefill P the first P tokens in
      ubatches and the rest one at a time. --kv-f32 keeps the caches in F32.
  tokenize   MODEL.gguf --texts texts.json [--add-special] [--parse-special] --out ids.json
      Each string of a JSON list tokenized with the model's vocabulary: a JSON list of id lists.
  detokenize MODEL.gguf --ids ids.json --out texts.json
      The inverse: one string per id list (bytes decoded as UTF-8, errors replaced).
  greedy     MODEL.gguf (--tokens 1,2,3 | --prompts P.json) [-n N] [--ubatch U] [--kv-f32] [--threads T]
             [--logits L.npy] --out gen.json
      The prompt, then N argmax steps one token at a time: {"generated": [...], "seconds_per_token": s}; with
      --prompts, each prompt in a fresh context: {"generated": [[...], ...]}. --logits saves the row each token
      was chosen from (float32 [prompts, N, n_vocab]).
  mtp        MODEL.gguf --tokens-file ids.npy --h-file h.npy [--ubatch U] [--threads T] --out ref.npz
      llama.cpp's MTP graph (a context of type LLAMA_CONTEXT_TYPE_MTP over the model loaded with load_mtp): row t
      at position t reads token ids[t] and the streams h[t] (float32 [n, n_embd * hc], given to the batch as the
      entry's embedding); the .npz has `logits`, one row per row.
  quantize   MODEL.gguf OUT [--ftype N] [--pure] [--imatrix sizes.json] [--dry-run]
      llama.cpp's quantizer (llama_model_quantize) to file type N; --imatrix gives every tensor named in the JSON
      object {name: number of values} a uniform importance matrix (all ones). --dry-run writes no model: OUT is
      a JSON object {tensor name: the ggml type name llama.cpp chose}, read from its log.

On a CPU with AMX, set DSV4_ORACLE_NO_REPACK=1 for quantized files (tools/oracle/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as L

GGML_TYPE_F32 = 0
# llama.cpp calls the log callback from C: keep the ctypes object alive as long as the module
_QUIET = L.llama_log_callback(lambda level, text, user_data: None)


def open_model(path: str, vocab_only: bool = False, load_mtp: bool = False) -> Any:
    """The model (with load_mtp: its MTP layer too), or exit with a message. DSV4_ORACLE_NO_REPACK=1 turns off the
    extra CPU buffer types: llama.cpp 0c1e570 repacks Q8_0 weights for AMX and then aborts on quantized deepseek4
    files on CPUs that have AMX."""
    L.llama_log_set(_QUIET, None)
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = vocab_only
    params.load_mtp = load_mtp
    if os.environ.get("DSV4_ORACLE_NO_REPACK") == "1":
        params.use_extra_bufts = False
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        sys.exit(f"llama.cpp could not load {path}")
    return model


def n_vocab(model: Any) -> int:
    return int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))


def open_context(model: Any, n_ctx: int, ubatch: int, threads: int, kv_f32: bool) -> Any:
    params = L.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = ubatch
    params.n_threads = params.n_threads_batch = threads
    if kv_f32:
        params.type_k = params.type_v = GGML_TYPE_F32
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        sys.exit("llama.cpp could not create a context")
    return ctx


class Decoder:
    """Feeds tokens to one sequence of a context through one llama_batch."""

    def __init__(self, ctx: Any, capacity: int, vocab_size: int) -> None:
        self.ctx = ctx
        self.batch = L.llama_batch_init(capacity, 0, 1)
        self.vocab_size = vocab_size

    def __call__(self, tokens: list[int], pos0: int, all_logits: bool) -> np.ndarray:
        """Decode `tokens` at positions pos0..; the logits of every token (all_logits) or of the last, as rows."""
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
        b.n_tokens = len(tokens)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            sys.exit(f"llama_decode returned {rc} at position {pos0}")
        if all_logits:
            rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(len(tokens), self.vocab_size))
        else:
            rows = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, len(tokens) - 1), shape=(1, self.vocab_size))
        return rows.copy()

    def free(self) -> None:
        L.llama_batch_free(self.batch)


def run_logits(a: argparse.Namespace) -> None:
    model = open_model(a.model)
    nv = n_vocab(model)
    if a.tokens:
        toks = [int(t) for t in a.tokens.split(",")]
    elif a.tokens_file:
        toks = np.load(a.tokens_file).astype(np.int64).tolist()
    else:
        toks = np.random.default_rng(a.seed).integers(0, nv, a.n_tokens).tolist()
    ctx = open_context(model, a.ctx or max(256, len(toks) + 16), a.ubatch, a.threads, a.kv_f32)
    decode = Decoder(ctx, a.ubatch, nv)
    batched = 0 if a.incremental else (len(toks) if a.prefill is None else a.prefill)  # tokens sent in ubatches
    logits = np.zeros((len(toks), nv), np.float32)
    start = time.perf_counter()
    pos = 0
    while pos < len(toks):
        step = min(a.ubatch, batched - pos) if pos < batched else 1
        logits[pos : pos + step] = decode(toks[pos : pos + step], pos, all_logits=True)
        pos += step
    ms = (time.perf_counter() - start) * 1e3
    print(f"{len(toks)} tokens in {ms:.1f} ms; argmax[:8]={logits.argmax(-1)[:8].tolist()}", file=sys.stderr)
    np.savez(a.out, tokens=np.array(toks, np.int32), logits=logits)
    decode.free()
    L.llama_free(ctx)
    L.llama_model_free(model)


def with_retry(call: Callable[[Any, int], int], make: Callable[[int], Any], capacity: int) -> tuple[Any, int]:
    """Call a llama.cpp function that writes into a buffer and returns minus the size it needs when the buffer is
    too small; retry once with that size."""
    buf = make(capacity)
    n = call(buf, capacity)
    if n < 0:
        capacity = -n
        buf = make(capacity)
        n = call(buf, capacity)
    return buf, n


def run_tokenize(a: argparse.Namespace) -> None:
    model = open_model(a.model, vocab_only=True)
    vocab = L.llama_model_get_vocab(model)
    with open(a.texts, encoding="utf-8") as f:
        texts = json.load(f)
    out = []
    for text in texts:
        raw = text.encode("utf-8")
        buf, n = with_retry(
            lambda buf, cap, raw=raw: L.llama_tokenize(vocab, raw, len(raw), buf, cap, a.add_special, a.parse_special),
            lambda cap: (L.llama_token * cap)(),
            len(raw) + 16,
        )
        out.append([int(buf[i]) for i in range(n)])
    with open(a.out, "w") as f:
        json.dump(out, f)
    L.llama_model_free(model)


def run_detokenize(a: argparse.Namespace) -> None:
    model = open_model(a.model, vocab_only=True)
    vocab = L.llama_model_get_vocab(model)
    with open(a.ids) as f:
        id_lists = json.load(f)
    out = []
    for ids in id_lists:
        arr, k = (L.llama_token * max(1, len(ids)))(*ids), len(ids)
        buf, n = with_retry(
            lambda buf, cap, arr=arr, k=k: L.llama_detokenize(vocab, arr, k, buf, cap, False, False),
            lambda cap: (ctypes.c_char * cap)(),
            16 * len(ids) + 16,
        )
        out.append(bytes(buf[:n]).decode("utf-8", "replace"))
    with open(a.out, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    L.llama_model_free(model)


def run_mtp(a: argparse.Namespace) -> None:
    model = open_model(a.model, load_mtp=True)
    if L.llama_model_n_layer_nextn(model) < 1:
        sys.exit(f"{a.model} has no MTP layer for llama.cpp")
    toks = np.load(a.tokens_file).astype(np.int64)
    h = np.ascontiguousarray(np.load(a.h_file), np.float32)
    nv = n_vocab(model)
    cp = L.llama_context_default_params()
    cp.n_ctx = max(256, len(toks) + 16)
    cp.n_batch = cp.n_ubatch = a.ubatch
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
    cp.n_rs_seq = 0
    ctx = L.llama_init_from_model(model, cp)  # (llama.cpp 0.3.36 divides by zero here when the attention head and
    if not ctx:  # the indexer's head have the same width: give test models different ones)
        sys.exit("llama.cpp could not create an MTP context")
    batch = L.llama_batch_ext_init(ctx)
    logits = np.zeros((len(toks), nv), np.float32)
    for s0 in range(0, len(toks), a.ubatch):
        L.llama_batch_ext_clear(batch)
        n = min(a.ubatch, len(toks) - s0)
        for i in range(n):
            idx = L.llama_batch_ext_add_token(batch, 0, int(toks[s0 + i]))
            pos = (L.llama_pos * 4)(s0 + i, 0, 0, 0)
            L.llama_batch_ext_set_pos(batch, idx, pos)
            row = h[s0 + i]
            e = L.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.shape[0])
            if not L.llama_batch_ext_set_embd_token(batch, idx, e):  # (as llama.cpp's draft-mtp passes them)
                sys.exit(f"could not set the streams of row {s0 + i}")
            L.llama_batch_ext_set_output_logits(batch, idx, True)
        rc = L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, batch)
        if rc != 0:
            sys.exit(f"llama_process returned {rc} at row {s0}")
        for i in range(n):
            logits[s0 + i] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(nv,))
    np.savez(a.out, logits=logits)
    L.llama_batch_ext_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


def run_greedy(a: argparse.Namespace) -> None:
    """Argmax decoding of -n tokens after a prompt (--tokens), or after each of several (--prompts, a JSON list of
    token lists; each in a fresh context). --logits also saves the rows each choice was made from (n per prompt)."""
    if (a.tokens is None) == (a.prompts is None):
        sys.exit("greedy: give --tokens or --prompts")
    if a.prompts is not None:
        with open(a.prompts, encoding="utf-8") as f:
            prompts = [[int(t) for t in p] for p in json.load(f)]
    else:
        prompts = [[int(t) for t in a.tokens.split(",")]]
    model = open_model(a.model)
    nv = n_vocab(model)
    runs, rows, per_token = [], [], []
    for toks in prompts:
        ctx = open_context(model, max(256, len(toks) + a.n + 16), a.ubatch, a.threads, a.kv_f32)
        decode = Decoder(ctx, max(a.ubatch, 1), nv)
        last = np.zeros((1, nv), np.float32)
        for pos in range(0, len(toks), a.ubatch):
            last = decode(toks[pos : pos + a.ubatch], pos, all_logits=False)
        pos = len(toks)
        generated = []
        start = time.perf_counter()
        for _ in range(a.n):
            rows.append(last[0].copy())
            tok = int(last[0].argmax())
            generated.append(tok)
            last = decode([tok], pos, all_logits=False)
            pos += 1
        per_token.append((time.perf_counter() - start) / max(1, a.n))
        runs.append(generated)
        decode.free()
        L.llama_free(ctx)
    out = {"generated": runs[0], "seconds_per_token": per_token[0]} if a.prompts is None else {"generated": runs}
    with open(a.out, "w") as f:
        json.dump(out, f)
    if a.logits:
        np.save(a.logits, np.array(rows, np.float32).reshape(len(prompts), a.n, nv))
    L.llama_model_free(model)


def run_quantize(a: argparse.Namespace) -> None:
    log: list[str] = []
    keep_log = L.llama_log_callback(lambda level, text, user_data: log.append(text.decode(errors="replace")))
    L.llama_log_set(keep_log if a.dry_run else _QUIET, None)
    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = a.ftype
    params.pure = a.pure
    params.nthread = 1
    params.dry_run = a.dry_run
    keep: list[Any] = []  # the buffers the C structs point into, alive until the call returns
    if a.imatrix:
        with open(a.imatrix) as f:
            sizes = json.load(f)
        entries = (L.llama_model_imatrix_data * (len(sizes) + 1))()
        for i, (name, n) in enumerate(sorted(sizes.items())):
            ones = (ctypes.c_float * n)(*([1.0] * n))
            keep += [ones, name.encode()]
            entries[i].name, entries[i].data, entries[i].size = keep[-1], ones, n
        keep.append(entries)
        params.imatrix = entries
    if L.llama_model_quantize(a.model.encode(), a.out.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {a.model}")
    if a.dry_run:  # "[ i/ n] name - [shape], type = src, size = ... MiB[ -> ... MiB (new)]"
        rows = re.findall(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^\n]*?(?:\((\S+)\))?\n", "".join(log))
        with open(a.out, "w") as f:
            json.dump({name: new or src for name, src, new in rows}, f)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("logits", help="logits at every position")
    p.add_argument("model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokens", help="comma-separated token ids")
    which.add_argument("--tokens-file", help="a .npy array of token ids")
    which.add_argument("--n-tokens", type=int, default=64, help="random token ids (default 64)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--ubatch", type=int, default=64)
    p.add_argument("--incremental", action="store_true")
    p.add_argument("--prefill", type=int)
    p.add_argument("--kv-f32", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run_logits)

    p = sub.add_parser("tokenize", help="token ids of texts")
    p.add_argument("model")
    p.add_argument("--texts", required=True)
    p.add_argument("--add-special", action="store_true")
    p.add_argument("--parse-special", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(run=run_tokenize)

    p = sub.add_parser("detokenize", help="texts of token ids")
    p.add_argument("model")
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run_detokenize)

    p = sub.add_parser("greedy", help="argmax decoding after a prompt")
    p.add_argument("model")
    p.add_argument("--tokens")
    p.add_argument("--prompts", help="a JSON file: a list of prompts (token lists), each decoded in a fresh context")
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--logits", help="an .npy file for the logits each token was chosen from: (prompts, n, vocab)")
    p.add_argument("--ubatch", type=int, default=64)
    p.add_argument("--kv-f32", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run_greedy)

    p = sub.add_parser("mtp", help="llama.cpp's MTP graph on given tokens and streams")
    p.add_argument("model")
    p.add_argument("--tokens-file", required=True)
    p.add_argument("--h-file", required=True)
    p.add_argument("--ubatch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run_mtp)

    p = sub.add_parser("quantize", help="llama.cpp's quantizer")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--ftype", type=int, required=True)
    p.add_argument("--pure", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--imatrix")
    p.set_defaults(run=run_quantize)
    return ap


def main() -> None:
    a = parser().parse_args()
    a.run(a)


if __name__ == "__main__":
    main()
