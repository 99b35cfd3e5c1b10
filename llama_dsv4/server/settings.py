"""Command-line flags -> typed settings for `llama-dsv4-server`.

The flags are llama-server's (short and long spellings), so the model card's command line works with our
executable's name. Every flag is either honoured (mapped to a `Llama` keyword or a server setting) or accepted
with a note saying why it does not apply on this build (`Settings.notes`, logged at startup). Unknown flags and
bad values are a `SettingsError` naming the flag.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..flags import (
    DEFAULT_CTX,
    _float,
    _int,
    add_model_flags,
    fit_threads,
    gpu_layers_device,
)

DEFAULT_PORT = 8080  # llama-server's
CACHE_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16, GGML_TYPE_F32: what the engine supports for its caches
REASONING_FORMATS = ("deepseek", "none", "auto", "deepseek-legacy")


class SettingsError(ValueError):
    """A command line that cannot be honoured: unknown flag, bad value, missing model."""


# the Settings fields passed to Llama(...) under their own names: always, and only when set (the seed, the cache type,
# MoE expert residency)
_LLAMA_FIELDS = (
    "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "flash_attn", "use_mlock", "use_mmap", "device",
    "logits_all", "verbose",
)  # fmt: skip
_LLAMA_IF_SET = (
    "seed", "type_k", "moe_hot_count", "moe_hot_budget_mib", "moe_stats_path", "spec_type", "rpc_servers",
    "tensor_split", "rpc_timeout", "moe_device_experts",
)  # fmt: skip
_LLAMA_IF_NOT_AUTO = ("moe_prefetch",)


@dataclass
class Settings:
    """What a llama-dsv4-server runs with: the model, the context and slots, threads, sampling defaults, the HTTP
    side (host, port, API key, timeouts, bounds) and the chat template. `parse_args` makes one from llama-server's
    flags; `llama_kwargs()` gives the keywords each slot's `Llama` is made with. The comment beside each field says
    what it does and which flag sets it."""

    # the model
    model: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_token: str | None = None
    n_ctx: int = DEFAULT_CTX  # total over the slots, as llama-server's --ctx-size (0: the model's trained context)
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int = -1  # -1: all
    flash_attn: bool = True
    use_mlock: bool = False
    use_mmap: bool = True
    seed: int | None = None
    type_k: int | None = None
    device: str = "auto"
    moe_hot_count: int | str | list[int] | None = None
    moe_hot_budget_mib: float | None = None
    moe_device_experts: int | None = None  # hot experts per MoE layer on the device (None or 0: off)
    moe_stats_path: str | None = None
    moe_prefetch: bool | str = "auto"  # ask for routed experts' missing pages as they are chosen (--[no-]moe-prefetch)
    spec_type: str | None = None  # "mtp": speculative decoding with the model's MTP layer (--spec-type draft-mtp)
    spec_draft_n_max: int = 2
    rpc_servers: str | None = None  # host:port,... of RPC servers holding a share of the layers (--rpc)
    tensor_split: list[float] | None = None  # their shares, then this machine's (--tensor-split)
    rpc_timeout: float | None = None  # seconds one evaluation on the split may take (--rpc-timeout; None: 120)
    logits_all: bool = False
    # chat
    chat_template: str | None = None  # a template name of the model ("deepseek-v4", "chat_template.default") or Jinja
    chat_template_file: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_format: str = "deepseek"
    # the server
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)
    alias: str | None = None
    parallel: int = 1
    cont_batching: bool = True  # --parallel N: one context of N sequences evaluated together (else N contexts)
    kv_unified: bool = False  # with cont_batching: each slot may use all of --ctx-size, the slots together too
    timeout: float = 600.0
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    max_body_mib: float = 32.0
    header_timeout: float = 10.0  # seconds to send a request's headers (from connecting or the previous answer)
    max_queue: int = 128  # requests waiting for a slot; more are answered 503
    slot_prompt_similarity: float = 0.1  # llama-server's: a free slot is chosen by prompt prefix (slots.SlotPool)
    limit_concurrency: int = 1000  # connections open at once; requests on more are answered 503
    send_buffer_kib: int = 256  # the kernel's send buffer per connection (0: the system's, autotuned up to MiBs)
    verbose: bool = False
    # request defaults (llama-server's sampling flags)
    n_predict: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # what llama-cpp-python's server flags ask beyond llama-server's (set by llama_dsv4.compat.server)
    llama_extra: dict[str, Any] = field(default_factory=dict)  # more Llama(...) keywords (chat_format, draft_model..)
    prompt_cache: tuple[str, int] | None = None  # ("ram" | "disk", capacity in bytes): a prompt cache per slot
    root_path: str = ""  # the path prefix a reverse proxy serves the API under
    sse_ping: bool = True  # comment lines every 15 s in streams (some clients cannot take them)
    # what was accepted without effect, and why
    notes: list[str] = field(default_factory=list)

    def llama_kwargs(self) -> dict[str, Any]:
        """The `Llama(...)` keywords of one slot, before the context is fitted to the model (see slots.py)."""
        kw: dict[str, Any] = {name: getattr(self, name) for name in _LLAMA_FIELDS}
        kw["n_threads_batch"] = self.n_threads_batch if self.n_threads_batch is not None else self.n_threads
        kw.update((name, getattr(self, name)) for name in _LLAMA_IF_SET if getattr(self, name) is not None)
        kw.update((name, getattr(self, name)) for name in _LLAMA_IF_NOT_AUTO if getattr(self, name) != "auto")
        if self.spec_type is not None:
            kw["spec_draft_n_max"] = self.spec_draft_n_max
        kw.update(self.llama_extra)
        return kw

    @property
    def model_name(self) -> str:
        """The id served in /v1/models and in responses."""
        if self.alias:
            return self.alias
        if self.model:
            return os.path.basename(self.model)
        return f"{self.hf_repo}:{self.hf_file}" if self.hf_file else str(self.hf_repo)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SettingsError(message.replace("unrecognized arguments", "unknown argument(s)"))


def _json_object(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--chat-template-kwargs is not JSON: {e.msg}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("--chat-template-kwargs must be a JSON object")
    return v


# flags of llama-server that are accepted but have no effect here, with the reason (value-taking, then switches)
_NOTE_VALUE_FLAGS: dict[tuple[str, ...], str] = {
    ("-sm", "--split-mode"): "one device per process on this build",
    ("-mg", "--main-gpu"): "one device per process on this build; pick it with --device",
    ("-ctv", "--cache-type-v"): "DeepSeek V4's attention has no separate value cache (keys are values)",
    ("--threads-http",): "HTTP is served by one asyncio loop; generation runs on one thread per slot",
    ("--numa",): "NUMA placement is left to the OS",
    ("--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale"): "the GGUF's rope settings are used",
    ("--yarn-orig-ctx", "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast"): (
        "the GGUF's rope settings are used"
    ),
    ("--cache-reuse",): "prompt prefixes are reused automatically per slot",
    ("--keep",): "context shifting is not supported (a prompt longer than the context is an error)",
    ("--reasoning-budget",): "thinking is switched by the chat template variables (chat_template_kwargs)",
    ("-lv", "--verbosity", "--log-verbosity"): "use -v / --verbose",
    ("--path",): "this server has no web UI",
    ("--api-prefix",): "routes are served at their usual paths",
    ("--slot-save-path",): "slot saving is not supported",
    ("-C", "--cpu-mask", "-Cr", "--cpu-range", "--prio", "--poll"): "thread placement is left to ggml and the OS",
    ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"): "not needed: this engine keeps its own state per slot",
    ("--model-alias",): "use --alias",
    ("--draft", "--draft-max", "--draft-min", "-md", "--model-draft"): "a separate draft model is not supported: "
    "use --spec-type draft-mtp (the model's own MTP layer)",
    ("--lora", "--lora-scaled", "--control-vector"): "adapters are not supported",
    ("-ot", "--override-tensor", "--override-kv"): "tensor and metadata overrides are not supported",
}
_NOTE_SWITCHES: dict[tuple[str, ...], str] = {
    ("--jinja",): "chat templates are always rendered with Jinja (sandboxed)",
    ("--no-jinja",): "chat templates are always rendered with Jinja (sandboxed)",
    ("--metrics",): "/metrics is always served",
    ("--slots", "--props", "--no-slots"): "/props is always served; /slots is not",
    ("--no-webui", "--webui"): "this server has no web UI",
    ("--swa-full",): "the sliding-window state is exact without it",
    ("--no-warmup", "--warmup"): "there is no warm-up run",
    ("-nkvo", "--no-kv-offload", "--kv-offload"): "the context lives on the device that computes",
    ("--no-op-offload",): "one device per process on this build",
    ("--log-disable", "--log-colors", "--log-prefix", "--log-timestamps"): "logging goes to stderr",
    ("--embedding", "--embeddings"): "DeepSeek V4 has no embeddings; /v1/embeddings answers 501",
    ("--check-tensors",): "tensors are always validated when the model is opened",
    ("--no-context-shift", "--context-shift"): "context shifting is not supported",
    ("--no-escape", "-e", "--escape"): "not applicable to a server",
}


def _number(a: Any, *flags: str, kind: type = int, lo: float | None = None, hi: int | None = None, **kw: Any) -> None:
    """Add a numeric flag (`kind` int or float, within [lo, hi]) whose bad values are named by its last spelling."""
    a(*flags, type=_float(flags[-1], lo) if kind is float else _int(flags[-1], lo, hi), **kw)


def _build() -> _Parser:
    p = _Parser(
        prog="llama-dsv4-server",
        description="OpenAI-compatible server for DeepSeek V4 GGUF models (llama-server's flags).",
        epilog="Also accepted, with a logged note that they do not apply: "
        + ", ".join(f[-1] for f in (*_NOTE_VALUE_FLAGS, *_NOTE_SWITCHES))
        + ".",
        allow_abbrev=False,
    )
    a = p.add_argument
    add_model_flags(p, "GGUF file, or any shard of a split set", ctx_note=", shared by the slots")
    a("-hft", "--hf-token", dest="hf_token", help="Hugging Face token (default: $HF_TOKEN)")
    a("-a", "--alias", help="model name served in /v1/models and responses (default: the file name)")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    _number(a, "--port", lo=0, hi=65535, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    _number(a, "-s", "--seed", help="RNG seed (-1: random)")
    a("-ctk", "--cache-type-k", dest="cache_type_k", choices=sorted(CACHE_TYPES), help="cache type: f16 or f32")
    a("--logits-all", action="store_true", help="keep every position's logits (for echo with logprobs)")
    a("--chat-template", help="a chat format of the model (deepseek-v4, chat_template.default) or a Jinja template")
    a("--chat-template-file", help="a Jinja chat template file")
    a(
        "--chat-template-kwargs",
        type=_json_object,
        default={},
        help="JSON object of template variables for every request, e.g. '{\"thinking\": true}'",
    )
    a(
        "--reasoning-format",
        choices=REASONING_FORMATS,
        default="deepseek",
        help="deepseek (default): thinking in reasoning_content; none: raw text",
    )
    _number(
        a,
        "-np",
        "--parallel",
        lo=1,
        hi=256,
        default=1,
        help="slots: requests served at once, each holding --ctx-size / N tokens (all of --ctx-size with "
        "--kv-unified); with continuous batching (the default) they are sequences of one context, evaluated "
        "together (default 1)",
    )
    a(
        "-cb",
        "--cont-batching",
        dest="cont_batching",
        action="store_true",
        default=True,
        help="continuous batching (the default): the --parallel slots are sequences of one context whose tokens "
        "are evaluated together",
    )
    a(
        "-nocb",
        "--no-cont-batching",
        dest="cont_batching",
        action="store_false",
        help="each slot its own context (the model's weights shared, not its computation)",
    )
    a(
        "-kvu",
        "--kv-unified",
        dest="kv_unified",
        action="store_true",
        default=False,
        help="with continuous batching: each slot may hold all of --ctx-size tokens, the running requests together "
        "at most --ctx-size (a request that would exceed it is answered 400); each slot's state is allocated for "
        "all of --ctx-size",
    )
    a("--no-kv-unified", dest="kv_unified", action="store_false", help="each slot --ctx-size / N tokens (default)")
    a("--api-key", help="API key(s), comma-separated, required on every endpoint but /health (or $LLAMA_API_KEY)")
    a("--api-key-file", help="file with one API key per line")
    _number(
        a,
        "-to",
        "--timeout",
        kind=float,
        lo=0,
        default=600.0,
        help="seconds a client may take to send a request body or stall a stream (default 600)",
    )
    _number(
        a,
        "--header-timeout",
        kind=float,
        lo=0,
        default=10.0,
        help="seconds a connection may take to send a request's headers, from connecting or from the previous "
        "answer; then it is closed (default 10, 0: no limit)",
    )
    _number(
        a,
        "-sps",
        "--slot-prompt-similarity",
        kind=float,
        lo=0,
        default=0.1,
        help="a request takes the free slot whose last prompt shares the longest prefix with its own, if more than "
        "this fraction of it; else the slot free the longest (default 0.1, 0: always the latter)",
    )
    _number(
        a,
        "--max-queue",
        lo=0,
        default=128,
        help="requests that may wait for a busy slot; more are answered 503 at once (default 128)",
    )
    _number(
        a,
        "--limit-concurrency",
        lo=1,
        default=1000,
        help="connections open at once; a request on a connection beyond it is answered 503 (default 1000)",
    )
    _number(
        a,
        "--send-buffer-kib",
        lo=0,
        default=256,
        help="kernel send buffer per connection: what a client that stops reading can park in the kernel "
        "(default 256, 0: the system's autotuned size, up to MiBs)",
    )
    a("--ssl-key-file", dest="ssl_keyfile", help="PEM private key for HTTPS")
    a("--ssl-cert-file", dest="ssl_certfile", help="PEM certificate for HTTPS")
    _number(a, "--max-body-mib", kind=float, lo=0.001, default=32.0, help="largest request body (default 32)")
    _number(
        a,
        "-n",
        "--predict",
        "--n-predict",
        dest="n_predict",
        default=-1,
        help="most tokens a request may generate (-1: until the end or the context is full)",
    )
    _number(a, "--temp", kind=float, dest="temperature", default=0.8, help="default temperature (0.8)")
    _number(a, "--top-k", lo=0, default=40, help="default top-k (40)")
    _number(a, "--top-p", kind=float, lo=0, default=0.95, help="default top-p (0.95)")
    _number(a, "--min-p", kind=float, lo=0, default=0.05, help="default min-p (0.05)")
    _number(a, "--repeat-penalty", kind=float, lo=0, default=1.0, help="default repeat penalty (1.0)")
    _number(a, "--presence-penalty", kind=float, default=0.0, help="default presence penalty")
    _number(a, "--frequency-penalty", kind=float, default=0.0, help="default frequency penalty")
    a("-v", "--verbose", action="store_true", help="log more (the engine's own messages too)")
    for noted, nargs in ((_NOTE_VALUE_FLAGS, 1), (_NOTE_SWITCHES, 0)):
        for flags, why in noted.items():
            dest = "_note_" + flags[-1].lstrip("-").replace("-", "_")
            a(*flags, dest=dest, action=_Note, note=why, nargs=nargs, help=argparse.SUPPRESS)
    return p


class _Note(argparse.Action):
    """A llama-server flag accepted with a note (value checked for presence only)."""

    def __init__(self, *args: Any, note: str, **kwargs: Any) -> None:
        self.note = note
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: str | None = None):
        shown = f"{opt} {values[0]}" if values else str(opt)
        ns.__dict__.setdefault("_notes", []).append(f"{shown}: accepted, no effect ({self.note})")


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Parse llama-server style flags. Raises SettingsError (with the flag's name) on anything it cannot honour;
    `--help` prints the usage and exits (SystemExit)."""
    env = dict(os.environ) if env is None else env
    ns = _build().parse_args(argv)
    s = Settings()
    notes: list[str] = list(getattr(ns, "_notes", []))

    s.model, s.hf_file, s.hf_token = ns.model, ns.hf_file, ns.hf_token or env.get("HF_TOKEN")
    if ns.hf_repo:
        repo, _, tag = ns.hf_repo.partition(":")
        if not repo or repo.count("/") != 1:
            raise SettingsError(f"--hf-repo takes user/model[:file or quant], got {ns.hf_repo!r}")
        s.hf_repo = repo
        if tag and not s.hf_file:
            s.hf_file = tag if tag.endswith(".gguf") or any(c in tag for c in "*?[") else f"*{tag}*.gguf"
    if s.model and s.hf_repo:
        raise SettingsError("give either --model or --hf-repo, not both")
    if not s.model and not s.hf_repo:
        raise SettingsError("no model: pass --model FILE.gguf (or --hf-repo user/model)")
    if s.model and not os.path.exists(s.model):
        raise SettingsError(f"--model {s.model}: no such file")

    s.n_ctx, s.n_batch, s.n_ubatch = ns.n_ctx, ns.n_batch, ns.n_ubatch
    if s.n_ubatch > s.n_batch:
        notes.append(f"--ubatch-size {s.n_ubatch} > --batch-size {s.n_batch}: using {s.n_batch}")
        s.n_ubatch = s.n_batch
    s.n_gpu_layers, s.device = ns.n_gpu_layers, ns.device
    s.device, note = gpu_layers_device(ns.n_gpu_layers, ns.device)
    if note:
        notes.append(note)
    s.flash_attn = ns.flash_attn != "off"
    s.use_mlock, s.use_mmap = ns.mlock, not ns.no_mmap
    s.seed = None if ns.seed is None or ns.seed < 0 else ns.seed
    s.type_k = CACHE_TYPES[ns.cache_type_k] if ns.cache_type_k else None
    s.moe_hot_count, s.moe_hot_budget_mib, s.moe_stats_path = ns.moe_hot_count, ns.moe_hot_budget_mib, ns.moe_stats_path
    s.moe_prefetch = ns.moe_prefetch
    s.moe_device_experts = ns.moe_device_experts or None
    s.rpc_servers, s.tensor_split, s.rpc_timeout = ns.rpc_servers, ns.tensor_split, ns.rpc_timeout
    if s.tensor_split is not None and not s.rpc_servers:
        raise SettingsError("--tensor-split needs --rpc: without RPC servers the model runs on one device")
    s.logits_all = ns.logits_all
    s.spec_type = "mtp" if ns.spec_type == "draft-mtp" else None
    s.spec_draft_n_max = ns.spec_draft_n_max

    s.chat_template = ns.chat_template
    s.chat_template_file = ns.chat_template_file
    if s.chat_template_file and not os.path.isfile(s.chat_template_file):
        raise SettingsError(f"--chat-template-file {s.chat_template_file}: no such file")
    if s.chat_template and s.chat_template_file:
        raise SettingsError("give either --chat-template or --chat-template-file, not both")
    s.chat_template_kwargs = ns.chat_template_kwargs
    s.reasoning_format = "none" if ns.reasoning_format == "none" else "deepseek"

    s.host, s.port, s.alias, s.parallel, s.timeout = ns.host, ns.port, ns.alias, ns.parallel, ns.timeout
    s.cont_batching, s.kv_unified = ns.cont_batching, ns.kv_unified
    if s.kv_unified and (not s.cont_batching or s.parallel == 1):
        why = "without continuous batching each slot has its own context" if s.parallel > 1 else "one slot"
        notes.append(f"--kv-unified: no effect ({why})")
        s.kv_unified = False
    if s.spec_type is not None and s.cont_batching and s.parallel > 1:
        raise SettingsError(
            "--spec-type draft-mtp drafts for one sequence per context: use --parallel 1, or --no-cont-batching "
            "(each slot its own context)"
        )
    # the slots' contexts compute at once and share the CPUs; one context of several sequences computes one step
    # at a time, with all of them
    s.n_threads, s.n_threads_batch = fit_threads(ns, notes, 1 if s.cont_batching else s.parallel)
    keys = [k.strip() for k in (ns.api_key or env.get("LLAMA_API_KEY") or "").split(",") if k.strip()]
    if ns.api_key_file:
        try:
            with open(ns.api_key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise SettingsError(f"--api-key-file {ns.api_key_file}: {e.strerror}") from None
    s.api_keys = keys
    s.ssl_keyfile, s.ssl_certfile = ns.ssl_keyfile, ns.ssl_certfile
    if bool(s.ssl_keyfile) != bool(s.ssl_certfile):
        raise SettingsError("HTTPS needs both --ssl-key-file and --ssl-cert-file")
    s.max_body_mib = ns.max_body_mib
    s.header_timeout, s.max_queue, s.limit_concurrency = ns.header_timeout, ns.max_queue, ns.limit_concurrency
    s.slot_prompt_similarity = ns.slot_prompt_similarity
    s.send_buffer_kib = ns.send_buffer_kib
    s.verbose = ns.verbose
    s.n_predict = ns.n_predict
    s.temperature, s.top_k, s.top_p, s.min_p = ns.temperature, ns.top_k, ns.top_p, ns.min_p
    s.repeat_penalty, s.presence_penalty, s.frequency_penalty = (
        ns.repeat_penalty,
        ns.presence_penalty,
        ns.frequency_penalty,
    )
    s.notes = notes
    return s


def usage() -> str:
    return _build().format_help()
