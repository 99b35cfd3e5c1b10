"""What the API layer needs from the engine, in plain Python (llama.py does not touch ggml or Cython types)."""

from __future__ import annotations

import os
import time
from typing import Any

from .. import _ggml
from ..model.loader import ModelFile
from ..model.params import DSV4Params
from .context import Context
from .governor import Governor, Sensors, governor_enabled, proc_stat_idle, schedstat_delays
from .isolated import ChildSpec, IsolatedContext
from .memory import state_bytes

MAX_CTX = 1 << 30  # positions (kept in C ints and int32 graph inputs by the engine)


def available_host_memory() -> int | None:
    """Bytes of host memory this process can still take: the kernel's MemAvailable, within the cgroup's limit if
    there is one (a container), else the physical memory; None if the system does not say."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = max(int(limit) - usage, 0)
            avail = room if avail is None else min(avail, room)
        break
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    return avail


def memory_limit() -> int | None:
    """The smallest memory limit on this process's cgroup path (cgroup v2 `memory.max` or v1
    `memory.limit_in_bytes`, of its own group and of each group above it), None where there is none."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "" or "memory" in controllers.split(","):
            root, knob = (
                ("/sys/fs/cgroup", "memory.max")
                if controllers == ""
                else ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            )
            limits = []
            parts = [p for p in path.split("/") if p and p not in (".", "..")]
            for depth in range(len(parts), -1, -1):
                try:
                    with open(os.path.join(root, *parts[:depth], knob)) as f:
                        value = f.read().strip()
                except OSError:
                    continue
                if value.isdigit() and int(value) < 1 << 60:
                    limits.append(int(value))
            if limits:
                return min(limits)
    return None


def host_memory_total() -> int | None:
    """Bytes of memory this process may ever hold: the physical memory, or its cgroup's limit where lower."""
    try:
        total: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        total = None
    limit = memory_limit()
    return limit if total is None else total if limit is None else min(total, limit)


def memory_short_of(nbytes: int) -> bool:
    """Whether a mapped model of nbytes cannot stay in memory: more than 90 % of host_memory_total()."""
    total = host_memory_total()
    return total is not None and nbytes > 0.9 * total


def check_memory(
    params: DSV4Params,
    n_ctx: int,
    n_ubatch: int,
    type_k: str,
    backends: Any,
    host_bytes: int = 0,
    weight_bytes: int = 0,
    use_mmap: bool = True,
    n_seq: int = 1,
) -> None:
    """ValueError, before anything is allocated, if a context of n_ctx positions for n_seq sequences cannot fit:
    its state (on the backend's device), `host_bytes` of the caller's token buffers (on the host), and the model's
    `weight_bytes` where they are copied into allocated memory (use_mmap=False, or a device that cannot read host
    memory). Mapped weights are not counted: they are page cache, which the kernel reclaims and reads back."""
    if n_ctx > MAX_CTX:
        raise ValueError(f"n_ctx={n_ctx} is beyond this engine's limit of {MAX_CTX} positions")
    state = state_bytes(params, n_ctx, min(n_ubatch, n_ctx), type_k, n_seq)
    dev = next((d for d in _ggml.devices() if d["name"] == backends.names[0]), None)
    on_host = dev is None or dev["type"] == "cpu"
    mapped = use_mmap and (on_host or (dev is not None and dev["buffer_from_host_ptr"]))
    weights = 0 if mapped else weight_bytes
    if not on_host and dev is not None and state + weights > dev["memory_free"]:
        raise ValueError(
            f"n_ctx={n_ctx} needs {_gib(state)} GiB of context state"
            + (f" for {n_seq} sequences" if n_seq > 1 else "")
            + (f" and {_gib(weights)} GiB of weights" if weights else "")
            + f" on {dev['name']}, which has {_gib(dev['memory_free'])} GiB free; use a smaller n_ctx"
        )
    need = host_bytes + (state + weights if on_host else 0)
    avail = available_host_memory()
    if avail is not None and need > 0.95 * avail:
        what = "the context state and token buffers"
        if on_host and weights:
            what = f"the weights read into memory ({_gib(weights)} GiB, use_mmap=False), {what}"
        raise ValueError(
            f"n_ctx={n_ctx} needs {_gib(need)} GiB of memory for {what}, and {_gib(avail)} GiB is available; "
            "use a smaller n_ctx" + (" or use_mmap=True" if on_host and weights else "")
        )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def create_context(
    model: ModelFile,
    *,
    rpc_servers: list[str] | None = None,
    tensor_split: list[float] | None = None,
    rpc_timeout: float = 120.0,
    **kwargs: Any,
) -> Context | IsolatedContext:
    """A Context of n_seq sequences (with mtp: running the MTP block too, docs/speculative.md), after checking that
    their state, the model's weights where they are copied (use_mmap=False) and `host_bytes` more on the host fit
    in memory. keep_back: truncations by up to that many positions need no evaluation again (backup rows for
    speculative decoding's rejected drafts).

    kwargs: build_context's (params, n_ctx, n_ubatch, type_k, flash_attn, device, n_threads, host_bytes, n_seq,
    mtp, keep_back, hot_experts: each MoE layer's hot experts copied to the device, engine/hot_experts.py).
    rpc_servers: "host:port" endpoints of llama-dsv4-rpc-server processes that take a share of the layers
    (tensor_split: the shares, the servers in order, then this machine; default: by free memory). The context then
    runs in a child process (engine/isolated.py), and a failure of the split is an RPCError within
    rpc_timeout seconds per call (docs/rpc.md)."""
    if not rpc_servers:
        if tensor_split is not None and len(tensor_split) > 1:
            raise ValueError("tensor_split needs rpc_servers: this build runs the model on one local device")
        return build_context(model, **kwargs)
    endpoints = parse_endpoints(rpc_servers)
    if kwargs.get("mtp"):
        raise ValueError("speculative decoding with the MTP layer does not run on a split across RPC servers yet")
    if kwargs.get("hot_experts"):
        raise ValueError("hot experts on a device (moe_device_experts) do not combine with a split across RPC servers")
    if not _ggml.rpc_available():
        raise RuntimeError(
            "rpc_servers needs ggml's RPC backend, which this libggml lacks (the PyPI wheel of "
            f"libggml-python is built without it); install the RPC-enabled build: {_ggml.RPC_INSTALL}"
        )
    spec = ChildSpec(
        str(model.path), bool(model.use_mmap), {**kwargs, "rpc_servers": endpoints, "tensor_split": tensor_split}
    )
    # sending the weights: at least 20 MB/s, and never less than 10 minutes, before a silent server counts as failed
    return IsolatedContext(spec, timeout=rpc_timeout, load_timeout=max(600.0, model.n_bytes / 20e6))


def parse_endpoints(servers: str | list[str]) -> list[str]:
    """ "host:port,host:port" (or a list) as checked endpoints; ValueError naming a bad one."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = []
    for item in items:
        ep = str(item).strip()
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
            raise ValueError(f"RPC server {ep!r}: expected host:port (for example 127.0.0.1:50052)")
        out.append(ep)
    if not out:
        raise ValueError("rpc_servers is empty")
    if len(out) > 16:
        raise ValueError(f"at most 16 RPC servers (ggml's limit), got {len(out)}")
    return out


def build_context(
    model: ModelFile,
    params: DSV4Params,
    n_ctx: int,
    n_ubatch: int,
    type_k: str,
    flash_attn: bool,
    device: str,
    n_threads: int,
    host_bytes: int = 0,
    n_seq: int = 1,
    mtp: bool = False,
    keep_back: int = 0,
    rpc_servers: list[str] | None = None,
    tensor_split: list[float] | None = None,
    hot_experts: int = 0,
) -> Context:
    """create_context's local half: the Context in this process (with rpc_servers: the client of the split, which
    only a child process should be, engine/isolated.py)."""
    gemm, gemm_min = gemm_settings()  # a bad switch fails before anything is allocated
    governor_enabled()  # a bad switch fails before anything is allocated
    portable = os.environ.get("LLAMA_DSV4_GEMM") == "portable"
    backends = _ggml.Backends(device, n_threads, rpc=rpc_servers or (), tensor_split=tensor_split, portable=portable)
    weight_bytes = model.n_bytes
    if hot_experts:  # the hot experts' copies too; on a device beside the CPU, instead of all the experts
        weight_bytes += model.expert_bytes * hot_experts // params.n_expert
        weight_bytes -= model.expert_bytes if len(backends.names) > 1 else 0
    check_memory(params, n_ctx, n_ubatch, type_k, backends, host_bytes, weight_bytes, model.use_mmap, n_seq)
    return Context(
        model,
        n_ctx,
        n_ubatch=n_ubatch,
        type_k=type_k,
        backends=backends,
        flash_attn=flash_attn,
        params=params,
        gemm=gemm,
        gemm_min_tokens=gemm_min,
        n_seq=n_seq,
        mtp=mtp,
        keep_back=keep_back,
        hot_experts=hot_experts,
    )


def device_summary(be: _ggml.Backends | None) -> str:
    """The devices of a context's backends (`Context.backends`), for loading summaries ("CUDA0 + CPU", "CPU");
    where this libggml has an accelerator backend that found no device (a CUDA build with no NVIDIA GPU or driver),
    a note that the CPU runs everything instead."""
    if be is None:  # a split across RPC servers: the child process holds the backends
        return "split across RPC servers"
    names = [d["name"] for d in be.device_info()]
    text = " + ".join(names)
    idle = _ggml.idle_accelerators()
    if idle and len(names) == 1:
        text += (
            f" (this libggml has ggml's {', '.join(idle)} backend, which found no device: no GPU, or no driver; "
            "everything runs on the CPU)"
        )
    return text


def gemm_settings() -> tuple[str, int]:
    """The benchmark switches of our prompt-processing products (kernels/README.md): LLAMA_DSV4_GEMM (auto, off,
    scalar, avx2, avx512, vnni; off = ggml's products everywhere; portable = ggml's ops for everything, as a split
    across RPC servers computes) and LLAMA_DSV4_GEMM_MIN_TOKENS (the smallest
    ubatch that uses them, default 8). ValueError naming the variable for a value that cannot be used."""
    gemm = os.environ.get("LLAMA_DSV4_GEMM", "auto")
    if gemm == "portable":  # ggml's ops only, none of our CPU kernels: the graph a split across RPC servers runs
        gemm = "off"
    try:
        _ggml.gemm_isa(gemm)
    except ValueError as e:
        raise ValueError(f"LLAMA_DSV4_GEMM={gemm!r}: {e}") from None
    raw = os.environ.get("LLAMA_DSV4_GEMM_MIN_TOKENS", "8")
    try:
        gemm_min = int(raw)
    except ValueError:
        gemm_min = 0
    if gemm_min < 1:
        raise ValueError(f"LLAMA_DSV4_GEMM_MIN_TOKENS must be a positive integer, got {raw!r}")
    return gemm, gemm_min


def cpu_look() -> tuple[float, float | None]:
    """(monotonic time, idle CPU-seconds of the usable CPUs so far): take it when loading begins and hand it to
    thread_governor, which starts from the CPUs that were free meanwhile."""
    return time.monotonic(), proc_stat_idle()()


def thread_governor(ctx: Context | None, since: tuple[float, float | None] | None = None) -> Governor:
    """The context's Governor (engine/governor.py): each compute's thread count within the pool, lowered while
    the CPUs are contended unless LLAMA_DSV4_GOVERNOR=off. No context (vocab_only): one that does nothing."""
    be = ctx.backends if ctx is not None else None
    if be is None:  # no context (vocab_only), or one in a child process (engine/isolated.py)
        return Governor(1, lambda n: None, None)
    delays = schedstat_delays(be.worker_ids) if governor_enabled() and be.pool_threads > 1 else None
    sensors = Sensors(lambda: ctx.t_compute, delays, proc_stat_idle()) if delays is not None else None
    return Governor(be.pool_threads, be.set_threads, sensors, since=since)
