"""Command-line values shared by `llama-dsv4` (cli.py) and `llama-dsv4-server` (server/settings.py): the model and
engine flags both take (llama.cpp's spellings), argparse converters with messages that name the flag, thread
counts, and what -ngl means on this engine."""

from __future__ import annotations

import argparse
from typing import Any

from .engine.cpus import fit_count, physical_cores, usable_cpus
from .moe import parse_hot_count as _parse_hot_count


def _split(flag: str) -> Any:
    def parse(text: str) -> list[float]:
        try:
            shares = [float(x) for x in text.replace("/", ",").split(",")]
        except ValueError:
            shares = []
        if not shares or any(not x >= 0 for x in shares) or not sum(shares) > 0:
            raise argparse.ArgumentTypeError(f"{flag} takes non-negative shares such as 3,1, got {text!r}")
        return shares

    return parse


def gpu_layers_device(n_gpu_layers: int, device: str) -> tuple[str, str | None]:
    """llama.cpp's -ngl on an engine that runs the whole model on one device: 0 means the CPU (no offload), all /
    auto / N >= the layer count the device; a partial offload is not supported (noted)."""
    if n_gpu_layers == 0 and device == "auto":
        return "cpu", "--n-gpu-layers 0: running on the CPU"
    if n_gpu_layers > 0:
        return device, f"--n-gpu-layers {n_gpu_layers}: the whole model runs on --device {device} (no partial offload)"
    return device, None


def fit_threads(ns: argparse.Namespace, notes: list[str], slots: int = 1) -> tuple[int, int]:
    """-t and -tb for each of `slots` sequences computed at once (engine/cpus.py's fit_count): <= 0 or unset is
    the default (-t: the physical cores, -tb: -t), and neither is ever more than the slot's share of the CPUs
    this process may use (ggml's threads wait for each other spinning, so threads beyond the CPUs make every
    token many times slower); a count that was lowered gets a note."""
    cpus = usable_cpus()
    t = ns.n_threads if ns.n_threads is not None and ns.n_threads > 0 else None
    threads, note = fit_count("--threads", t, physical_cores(), cpus, slots)
    tb = ns.n_threads_batch if ns.n_threads_batch is not None and ns.n_threads_batch > 0 else None
    batch, batch_note = fit_count("--threads-batch", tb, threads, cpus, slots)
    notes.extend(n for n in (note, batch_note) if n is not None)
    return threads, batch


def _int(flag: str, lo: int | None = None, hi: int | None = None) -> Any:
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes an integer, got {s!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{flag} must be {rng}, got {v}")
        return v

    return conv


def _float(flag: str, lo: float | None = None) -> Any:
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {s!r}") from None
        if lo is not None and not v >= lo:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {lo}, got {s}")
        return v

    return conv


def _gpu_layers(s: str) -> int:
    if s.lower() in ("all", "auto"):
        return -1
    v = _int("--n-gpu-layers")(s)
    return -1 if v < 0 else v


def _on_off(flag: str) -> Any:
    def conv(s: str) -> str:
        v = s.lower()
        if v in ("on", "true", "1", "enabled"):
            return "on"
        if v in ("off", "false", "0", "disabled"):
            return "off"
        if v == "auto":
            return "auto"
        raise argparse.ArgumentTypeError(f"{flag} takes on, off or auto, got {s!r}")

    return conv


def parse_hot_count(s: str) -> int | str | list[int] | None:
    """`--moe-hot-count`: N, auto, off/0, or a comma list of N per layer (moe.parse_hot_count's rules)."""
    try:
        return _parse_hot_count(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("moe_hot_count", "--moe-hot-count")) from None


DEFAULT_CTX = 4096  # llama.cpp's default --ctx-size


def add_model_flags(p: argparse.ArgumentParser, model_help: str, ctx_note: str = "") -> None:
    """The flags that choose the model and how it runs: -m/-hf/-hff, context and batch sizes, threads, device,
    flash attention, --mlock, --no-mmap and the MoE residency flags. `ctx_note` is added to --ctx-size's help."""
    a = p.add_argument
    a("-m", "--model", help=model_help)
    a("-hf", "-hfr", "--hf-repo", dest="hf_repo", help="Hugging Face user/repo[:file or quant tag] (from_pretrained)")
    a("-hff", "--hf-file", dest="hf_file", help="file (or glob) in --hf-repo")
    a(
        "-c",
        "--ctx-size",
        dest="n_ctx",
        type=_int("--ctx-size", 0),
        default=DEFAULT_CTX,
        help=f"context size in tokens{ctx_note} (0: the model's; default {DEFAULT_CTX}; more than the model's "
        "trained context is clamped to it)",
    )
    a("-b", "--batch-size", dest="n_batch", type=_int("--batch-size", 1), default=2048, help="logical batch size")
    a(
        "-ub",
        "--ubatch-size",
        dest="n_ubatch",
        type=_int("--ubatch-size", 1),
        default=512,
        help="physical batch size (tokens per graph)",
    )
    a(
        "-t",
        "--threads",
        dest="n_threads",
        type=_int("--threads"),
        help="threads (<= 0 or default: the physical cores; never more than the usable CPUs, which the server's "
        "--parallel slots share; fewer while other processes keep the CPUs busy, unless LLAMA_DSV4_GOVERNOR=off)",
    )
    a(
        "-tb",
        "--threads-batch",
        dest="n_threads_batch",
        type=_int("--threads-batch"),
        help="threads for prompt processing (default: --threads)",
    )
    a(
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        dest="n_gpu_layers",
        type=_gpu_layers,
        default=-1,
        help="0: run on the CPU; N, auto or all: the whole model runs on --device (no partial offload)",
    )
    a("-dev", "--device", default="auto", help="ggml device: auto, cpu, or a device name (llama-dsv4 --list-devices)")
    a(
        "--rpc",
        dest="rpc_servers",
        metavar="SERVERS",
        help="comma-separated host:port of llama-dsv4-rpc-server processes that hold a share of the layers (needs "
        "the RPC-enabled install; the protocol has no authentication: use a private network or an SSH tunnel)",
    )
    a(
        "--rpc-timeout",
        dest="rpc_timeout",
        type=_float("--rpc-timeout", 0.001),
        help="with --rpc: seconds one evaluation may take before the split counts as failed (default 120)",
    )
    a(
        "-ts",
        "--tensor-split",
        dest="tensor_split",
        type=_split("--tensor-split"),
        help="with --rpc: shares of the layers, the RPC servers in order then this machine, e.g. 3,3,2 "
        "(default: by free memory)",
    )
    a(
        "-fa",
        "--flash-attn",
        dest="flash_attn",
        nargs="?",
        const="on",
        default="auto",
        type=_on_off("--flash-attn"),
        help="on, off or auto (default auto = on): attention in f16 as llama.cpp's flash-attention path",
    )
    a("--mlock", action="store_true", help="lock the model's weights in RAM")
    a(
        "--no-mmap",
        dest="no_mmap",
        action="store_true",
        help="read the weights into memory instead of mapping the file (needs RAM for all of them; the file may then "
        "change while running: a mapped file must not be modified or truncated)",
    )
    a("--mmap", dest="no_mmap", action="store_false", help="memory-map the weights (the default)")
    a("--moe-hot-count", type=parse_hot_count, help="MoE experts kept resident per layer: N, auto, or a,b,c per layer")
    a("--moe-hot-budget-mib", type=_float("--moe-hot-budget-mib", 0), help="memory budget for resident experts")
    a("--moe-stats-path", help="file where expert-use statistics persist between runs")
    a(
        "--moe-device-experts",
        type=_int("--moe-device-experts", 0),
        default=0,
        metavar="N",
        help="each MoE layer's N most used experts in the device's memory, the others in host memory computed by the "
        "CPU, every other weight on the device (for a GPU smaller than the model; 0: off)",
    )
    a(
        "--moe-prefetch",
        dest="moe_prefetch",
        action="store_const",
        const=True,
        default="auto",
        help="as soon as a layer has chosen its experts, ask the kernel for their pages not in memory (results "
        "unchanged; default: on where the model is larger than 90%% of the memory the process may hold)",
    )
    a("--no-moe-prefetch", dest="moe_prefetch", action="store_const", const=False, help="never prefetch experts")
    a(
        "--spec-type",
        choices=("none", "draft-mtp"),
        default="none",
        help="speculative decoding: draft-mtp (the model's MTP layer drafts, the model verifies; greedy output "
        "unchanged) or none (default)",
    )
    a(
        "--spec-draft-n-max",
        type=_int("--spec-draft-n-max", 1, 16),
        default=2,
        help="tokens drafted per step with --spec-type draft-mtp (default 2)",
    )
