"""`llama-dsv4`: the command line for the main job, in the spirit of llama-cli.

    llama-dsv4 -m model.gguf -p "Once upon a time," -n 512      # complete a prompt, streamed
    llama-dsv4 -hf user/repo[:file] -cnv                         # chat on stdin (Llama.from_pretrained)
    llama-dsv4                                                   # the embedded demo model answers two sums
    llama-dsv4 -m model.gguf --info                              # what the file holds, and a greedy check

Logs (the demo model's note and the seed included), the loading progress bar and the tokens/s line go to stderr;
the text goes to stdout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

import numpy as np

from . import __version__, _ggml
from .demo import DEMO_NAME_PREFIX, DEMO_QUESTIONS, demo_model_path
from .engine import runtime
from .engine.context import Context
from .flags import (
    _float,
    _int,
    add_model_flags,
    fit_threads,
    gpu_layers_device,
)
from .model.loader import ModelFile, load_model

DEFAULT_PROMPT = "Once upon a time,"
DEMO_N_PREDICT = 160  # a worked 3-digit sum and its answer
DEMO_NOTE = (
    "NOTE: no model given: running the embedded demo model ({name}): a tiny deepseek4 trained on worked arithmetic, "
    "two demo tools, JSON and a little English, with its own small vocabulary. Pass -m MODEL.gguf (or -hf user/repo) "
    "for a real model."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        message = message.replace("unrecognized arguments", "unknown argument(s)")
        self.exit(2, f"llama-dsv4: error: {message}\n(llama-dsv4 --help lists the options)\n")


def _parser() -> _Parser:
    p = _Parser(
        prog="llama-dsv4",
        description="Run DeepSeek V4 GGUF models (deepseek4) on ggml: complete a prompt or chat. Without a model, "
        "runs the embedded demo model (a tiny trained deepseek4) on two arithmetic questions.",
        allow_abbrev=False,
    )
    a = p.add_argument
    add_model_flags(p, "GGUF file or any shard of a split set (default: the embedded demo model)")
    a("-p", "--prompt", help=f"prompt to complete (default {DEFAULT_PROMPT!r})")
    a("-f", "--file", help="read the prompt from a file")
    a(
        "-n",
        "--n-predict",
        "--predict",
        dest="n_predict",
        type=_int("--n-predict"),
        help=f"tokens to generate (-1: until the end of the text or the context; default -1, {DEMO_N_PREDICT} for "
        "the demo model)",
    )
    a(
        "--temp",
        dest="temperature",
        type=_float("--temp"),
        default=None,
        help="temperature (0: greedy; default 0.8, and 0 for the demo model's own questions)",
    )
    a("--top-k", type=_int("--top-k", 0), default=40)
    a("--top-p", type=_float("--top-p", 0), default=0.95)
    a("--min-p", type=_float("--min-p", 0), default=0.05)
    a("--repeat-penalty", type=_float("--repeat-penalty", 0), default=1.0)
    a(
        "-s",
        "--seed",
        type=_int("--seed"),
        default=-1,
        help="RNG seed (default -1: a random one per run, printed to stderr so that -s repeats the run)",
    )
    a("-cnv", "--conversation", dest="chat", action="store_true", help="chat: read your turns from stdin")
    a("-i", "--interactive", dest="chat", action="store_true", help="same as -cnv")
    a("-no-cnv", "--no-conversation", dest="chat", action="store_false", help="complete the prompt (default)")
    a("-sys", "--system-prompt", dest="system", help="system message for chat")
    a("--think", action="store_true", help="chat with thinking on (shown between [thinking] and [/thinking])")
    a("--chat-template-file", help="Jinja chat template file")
    a("--jinja", action="store_true", help="accepted: templates are always Jinja")
    a("--no-display-prompt", action="store_true", help="do not print the prompt before the completion")
    a("--no-preload", action="store_true", help="do not read the weights into the page cache before starting")
    a("--info", action="store_true", help="print what the model file holds and a greedy check, then exit")
    a("--list-devices", action="store_true", help="list the devices of this libggml build and exit")
    a("-v", "--verbose", action="store_true")
    a("--version", action="version", version=f"llama-dsv4 {__version__}")
    return p


# ---------------------------------------------------------------------------------------------- --info


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


def _summary(path: str, device: str, threads: int, n_predict: int, use_mmap: bool = True) -> str:
    t0 = time.perf_counter()
    model = load_model(path, use_mmap=use_mmap)
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
        f"backends    {runtime.device_summary(backends)}, {backends.threads} threads; weights "
        f"{'mapped zero-copy' if weights.zero_copy else 'copied' if use_mmap else 'read into memory'} on "
        f"{weights.device}",
        f"loaded in   {dt * 1e3:.1f} ms",
    ]
    if name.startswith(DEMO_NAME_PREFIX):
        lines.insert(0, "NOTE: the embedded demo model (tiny, trained on a 2-core CPU); -m MODEL.gguf runs a real one.")
    if n_predict > 0:
        lines.append(_decode(model, backends, n_predict))
    del weights
    model.close()
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- loading


class _Bar:
    """A progress bar on stderr: redrawn in place on a terminal, one line at the end otherwise."""

    def __init__(self, label: str, total: int, out: TextIO) -> None:
        self.label, self.total, self.out = label, max(total, 1), out
        self.tty = out.isatty()
        self.t0 = time.perf_counter()
        self.shown = -1

    def update(self, done: int) -> None:
        pct = int(100 * done / self.total)
        if self.tty and pct != self.shown:
            self.shown = pct
            fill = pct * 30 // 100
            self.out.write(
                f"\r{self.label} [{'#' * fill}{'-' * (30 - fill)}] {pct:3d}% "
                f"{done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB"
            )
            self.out.flush()

    def finish(self, what: str) -> None:
        dt = time.perf_counter() - self.t0
        bar = "#" * 30
        self.out.write(("\r" if self.tty else "") + f"{self.label} [{bar}] 100% {what} in {dt:.1f} s\n")
        self.out.flush()


def _mem_available() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _preload(paths: list[str], err: TextIO) -> None:
    """Read the weights through the page cache with a progress bar, so the first tokens do not wait on the disk.
    Skipped for a model larger than half the free memory (it is then mapped in lazily)."""
    total = sum(os.path.getsize(p) for p in paths)
    avail = _mem_available()
    if avail is not None and total > avail // 2:
        err.write(f"llama-dsv4: {total / 2**30:.1f} GiB of weights, more than half the free memory: mapped lazily\n")
        return
    bar = _Bar("loading", total, err)
    buf = bytearray(16 << 20)
    done = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buf):
                done += n
                bar.update(done)
    bar.finish(f"{total / 2**20:,.0f} MiB read")


def _model_path(args: argparse.Namespace) -> str:
    """-m as given, or -hf downloaded (every shard of a split set). Llama.from_pretrained is this download and then
    Llama(path): the CLI takes the two steps itself to read the model's header in between."""
    if not args.hf_repo:
        return str(args.model)
    from .hub import download

    repo, _, tag = args.hf_repo.partition(":")
    filename = args.hf_file or (
        tag if tag.endswith(".gguf") or any(c in tag for c in "*?[") else f"*{tag}*.gguf" if tag else ""
    )
    return download(repo, filename)


def _open(args: argparse.Namespace, err: TextIO) -> Any:
    from .llama import Llama

    notes: list[str] = []
    threads, batch_threads = fit_threads(args, notes)
    device, device_note = gpu_layers_device(args.n_gpu_layers, args.device)
    for note in [*notes, *([device_note] if device_note else [])]:
        err.write(f"llama-dsv4: {note}\n")
    kw: dict[str, Any] = dict(
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        n_ubatch=min(args.n_ubatch, args.n_batch),
        n_threads=threads,
        n_threads_batch=batch_threads,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn != "off",
        use_mlock=args.mlock,
        use_mmap=not args.no_mmap,
        device=device,
        verbose=args.verbose,
    )
    # -s -1 (the default): a fresh seed per run, as llama.cpp does, shown so that the run can be repeated
    seed = args.seed if args.seed >= 0 else secrets.randbelow(2**32)
    kw["seed"] = seed
    for name in ("moe_hot_count", "moe_hot_budget_mib", "moe_stats_path"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw["moe_prefetch"] = args.moe_prefetch
    if args.moe_device_experts:
        kw["moe_device_experts"] = args.moe_device_experts
    if args.rpc_servers:
        kw["rpc_servers"], kw["tensor_split"] = args.rpc_servers, args.tensor_split
        if args.rpc_timeout is not None:
            kw["rpc_timeout"] = args.rpc_timeout
    if args.spec_type == "draft-mtp":
        kw["spec_type"], kw["spec_draft_n_max"] = "mtp", args.spec_draft_n_max
    path = _model_path(args)
    model = load_model(path)  # the header: shards, trained context
    paths, n_train = list(model.paths), model.params.n_ctx_train
    model.close()
    if kw["n_ctx"] == 0 or kw["n_ctx"] > n_train:
        if kw["n_ctx"] > n_train:
            err.write(f"llama-dsv4: --ctx-size {kw['n_ctx']} is more than the model's {n_train}: using {n_train}\n")
        kw["n_ctx"] = n_train
    if not args.no_preload and not args.no_mmap:  # --no-mmap reads the files anyway
        _preload(paths, err)
    t0 = time.perf_counter()
    llm = Llama(model_path=path, **kw)
    if args.chat_template_file:
        from .chat.handlers import template_from_file

        template_from_file(llm, args.chat_template_file)
    err.write(
        f"llama-dsv4: opened {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s: n_ctx {llm.n_ctx()}, "
        f"threads {threads}, seed {seed}{'' if args.seed >= 0 else f' (-s {seed} repeats this run)'}"
        + (f", on {runtime.device_summary(llm._ctx.backends)}" if llm._ctx is not None else "")
        + "\n"
    )
    return llm


# ---------------------------------------------------------------------------------------------- generation


class _Meter:
    """A logits processor that times the prompt (until the first token) and counts the sampled tokens."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.n_prompt = 0
        self.n = 0

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.t_first is None:
            self.t_first, self.n_prompt = time.perf_counter(), len(input_ids)
        self.n += 1
        return scores

    def line(self, n_generated: int) -> str:
        end = time.perf_counter()
        first = self.t_first or end
        tp, tg = first - self.t0, end - first
        pps = f"{self.n_prompt / tp:.1f}" if tp > 0 else "-"
        gps = f"{n_generated / tg:.1f}" if tg > 0 and n_generated else "-"
        return (
            f"llama-dsv4: prompt {self.n_prompt} tokens in {tp:.2f} s ({pps} tokens/s); "
            f"generated {n_generated} tokens in {tg:.2f} s ({gps} tokens/s)"
        )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
    )


def _complete(llm: Any, prompt: str, n_predict: int, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    from .sampling import LogitsProcessorList

    meter = _Meter()
    if not args.no_display_prompt:
        out.write(prompt)
        out.flush()
    chunks = llm.create_completion(
        prompt,
        max_tokens=n_predict if n_predict > 0 else None,
        stream=True,
        logits_processor=LogitsProcessorList([meter]),
        **_sampling(args),
    )
    finish = None
    try:
        for c in chunks:
            ch = c["choices"][0]
            out.write(ch["text"])
            out.flush()
            finish = ch["finish_reason"] or finish
    finally:
        chunks.close()
        out.write("\n")
        out.flush()
        n = meter.n - 1 if finish == "stop" and meter.n else meter.n
        err.write(meter.line(n) + "\n")


def _chat(llm: Any, n_predict: int, args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> None:
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    err.write("llama-dsv4: chat mode; end with /exit or Ctrl-D\n")
    while True:
        out.write("\n> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            out.write("\n")
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": _turn(llm, messages, n_predict, args, out, err)})


def _turn(
    llm: Any, messages: list[dict[str, Any]], n_predict: int, args: argparse.Namespace, out: TextIO, err: TextIO
) -> str:
    """One assistant turn streamed to `out` (thinking between [thinking] and [/thinking], tool calls shown); the
    tokens/s line to `err`. Returns the answer's text."""
    from .sampling import LogitsProcessorList

    meter = _Meter()
    answer, thinking, finish = [], False, None
    chunks: Iterator[dict[str, Any]] = llm.create_chat_completion(
        messages,
        max_tokens=n_predict if n_predict > 0 else None,
        stream=True,
        logits_processor=LogitsProcessorList([meter]),
        chat_template_kwargs={"thinking": bool(args.think)},
        **_sampling(args),
    )
    try:
        for c in chunks:
            ch = c["choices"][0]
            delta = ch["delta"]
            if delta.get("reasoning_content"):
                if not thinking:
                    out.write("[thinking] ")
                    thinking = True
                out.write(delta["reasoning_content"])
            if delta.get("content"):
                if thinking:
                    out.write(" [/thinking]\n")
                    thinking = False
                out.write(delta["content"])
                answer.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                out.write(f"[tool call {call['function']['name']}({call['function']['arguments']})]")
            out.flush()
            finish = ch["finish_reason"] or finish
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if thinking:
        out.write(" [/thinking]")
    out.write("\n")
    n = meter.n - 1 if finish in ("stop", "tool_calls") and meter.n else meter.n
    err.write(meter.line(n) + "\n")
    return "".join(answer)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.list_devices:
        for d in _ggml.devices():
            print(f"{d['name']:12s} {d['type']:6s} {d['description']} ({d['memory_total'] / 2**30:.1f} GiB)")
        for name in _ggml.idle_accelerators():
            print(
                f"{name}: ggml's {name} backend is in this build but found no device (no GPU, or no driver): "
                "models run on the CPU"
            )
        return 0
    if args.model and args.hf_repo:
        err.write("llama-dsv4: error: give either -m or -hf, not both\n")
        return 2
    demo = not args.model and not args.hf_repo
    try:
        if args.info:
            path = demo_model_path() if demo else _model_path(args)
            n = 16 if args.n_predict is None else max(args.n_predict, 0)
            threads = fit_threads(args, [])[0]
            out.write(_summary(path, args.device, threads, n, not args.no_mmap) + "\n")
            return 0
        if demo:
            args.model = demo_model_path()
            with load_model(args.model) as m:
                err.write(DEMO_NOTE.format(name=m.metadata.get("general.name", "?")) + "\n")
        if args.model and not os.path.exists(args.model):
            raise ValueError(f"model file {args.model} does not exist")
        prompt = args.prompt
        if args.file:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        n_predict = args.n_predict if args.n_predict is not None else (DEMO_N_PREDICT if demo else -1)
        if args.temperature is None:  # the demo's answers are shown greedy: what the model knows, not a sample
            args.temperature = 0.0 if demo and prompt is None and not args.chat else 0.8
        llm = _open(args, err)
        try:
            if args.chat:
                _chat(llm, n_predict, args, sys.stdin, out, err)
            elif demo and prompt is None:  # the main job: the demo model answers questions it never saw
                messages = [{"role": "system", "content": args.system}] if args.system else []
                for q in DEMO_QUESTIONS:
                    out.write(f"> {q}\n")
                    _turn(llm, [*messages, {"role": "user", "content": q}], n_predict, args, out, err)
            else:
                _complete(llm, prompt if prompt is not None else DEFAULT_PROMPT, n_predict, args, out, err)
        finally:
            llm.close()
    except KeyboardInterrupt:
        err.write("\nllama-dsv4: interrupted\n")
        return 130
    except (ValueError, OSError) as e:
        err.write(f"llama-dsv4: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
