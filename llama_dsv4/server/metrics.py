"""Server metrics in the Prometheus text format (version 0.0.4), named like llama-server's with our prefix.

Counters: HTTP requests by route and status, completions, cancelled completions, prompt and generated tokens and
the seconds spent on each. Gauges: tokens/s (prompt and generation, over the server's life and over the last
completion), slots busy, requests waiting for a slot (the queue depth), context size. MoE expert residency
figures, from `Llama.moe_stats()` of each slot, labelled by slot; speculative decoding (`spec_stats()`) and
continuous batching (`batch_stats()`: steps, batch size, ubatch occupancy).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Any

PREFIX = "llamadsv4:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# moe_stats() key -> help; its metric is "moe_" + key (but for _MOE_NAMED's), a counter if the name ends in _total,
# else a gauge; hot_per_layer is a series per layer
_MOE_HELP = {
    "enabled": "1 when MoE expert residency is on",
    "locked_bytes": "bytes of hot experts locked in RAM",
    "lock_failed_bytes": "bytes of hot experts that could not be locked",
    "resident_bytes": "bytes of expert weights resident in RAM",
    "hot_bytes": "bytes of the experts classified hot",
    "budget_configured_bytes": "configured budget for hot experts",
    "budget_effective_bytes": "budget for hot experts in effect",
    "hit_rate": "share of routed experts that were hot",
    "hits": "routed experts that were hot",
    "routed": "experts routed",
    "reclassify_total": "hot-set updates",
    "reclassify_seconds_total": "seconds spent updating the hot set",
    "prefetch_calls": "prefetch nodes run (layers x ubatches, --moe-prefetch)",
    "prefetch_slices": "expert weight slices checked for missing pages",
    "prefetch_missing_slices": "expert weight slices with pages missing, asked for",
    "prefetch_missing_bytes": "bytes of expert weights asked for",
}
_MOE_NAMED = {
    "locked_bytes": "moe_hot_locked_bytes",
    "hits": "moe_hits_total",
    "routed": "moe_routed_total",
    **{f"prefetch_{k}": f"moe_prefetch_{k}_total" for k in ("calls", "slices", "missing_slices", "missing_bytes")},
}


def _moe_metric(key: str) -> tuple[str, str, str]:
    """(metric name, type, help) of a moe_stats() key."""
    name = _MOE_NAMED.get(key, "moe_" + key)
    return name, "counter" if name.endswith("_total") else "gauge", _MOE_HELP[key]


_MOE = {key: _moe_metric(key) for key in _MOE_HELP}


def _num(v: Any) -> str:
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc, strict=True)) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def add(self, name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], Any]]) -> None:
        full = PREFIX + name
        if full not in self._seen:
            self._seen.add(full)
            self.lines.append(f"# HELP {full} {help_}")
            self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Metrics:
    """Thread-safe counters fed by the app (requests) and by finished jobs (tokens, times)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.completions = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.predicted_tokens = 0
        self.prompt_seconds = 0.0
        self.predict_seconds = 0.0
        self.last_prompt_tps = 0.0
        self.last_predict_tps = 0.0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def job(self, n_prompt: int, n_predicted: int, t_prompt: float, t_predict: float, cancelled: bool) -> None:
        with self._lock:
            self.completions += 1
            self.cancelled += int(cancelled)
            self.prompt_tokens += n_prompt
            self.predicted_tokens += n_predicted
            self.prompt_seconds += t_prompt
            self.predict_seconds += t_predict
            if n_prompt and t_prompt > 0:
                self.last_prompt_tps = n_prompt / t_prompt
            if n_predicted and t_predict > 0:
                self.last_predict_tps = n_predicted / t_predict

    def render(self, slots: list[Any], waiting: int) -> str:
        """The exposition text; `slots` are the pool's slots (llm, n_ctx, job), `waiting` the queue depth."""
        w = _Writer()
        with self._lock:
            w.add(
                "requests_total",
                "counter",
                "HTTP requests by route and status code",
                [({"route": r, "status": s}, n) for (r, s), n in sorted(self.requests.items())] or [({}, 0)],
            )
            w.add("completions_total", "counter", "completions run", [({}, self.completions)])
            w.add(
                "completions_cancelled_total",
                "counter",
                "completions stopped because their client went away",
                [({}, self.cancelled)],
            )
            w.add("prompt_tokens_total", "counter", "prompt tokens processed", [({}, self.prompt_tokens)])
            w.add("prompt_seconds_total", "counter", "seconds spent on prompts", [({}, self.prompt_seconds)])
            w.add("tokens_predicted_total", "counter", "tokens generated", [({}, self.predicted_tokens)])
            w.add("tokens_predicted_seconds_total", "counter", "seconds spent generating", [({}, self.predict_seconds)])
            avg_p = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0
            avg_g = self.predicted_tokens / self.predict_seconds if self.predict_seconds > 0 else 0.0
            w.add("prompt_tokens_seconds", "gauge", "average prompt throughput, tokens/s", [({}, avg_p)])
            w.add("predicted_tokens_seconds", "gauge", "average generation throughput, tokens/s", [({}, avg_g)])
            w.add(
                "last_prompt_tokens_seconds",
                "gauge",
                "prompt throughput of the last completion, tokens/s",
                [({}, self.last_prompt_tps)],
            )
            w.add(
                "last_predicted_tokens_seconds",
                "gauge",
                "generation throughput of the last completion, tokens/s",
                [({}, self.last_predict_tps)],
            )
        busy = sum(1 for s in slots if s.job is not None)
        w.add("requests_processing", "gauge", "slots busy with a request", [({}, busy)])
        w.add("requests_deferred", "gauge", "requests waiting for a free slot (queue depth)", [({}, waiting)])
        w.add("slots_total", "gauge", "slots (--parallel)", [({}, len(slots))])
        w.add("n_ctx", "gauge", "context size of each slot, tokens", [({"slot": s.id}, s.n_ctx) for s in slots])
        w.add("uptime_seconds", "gauge", "seconds since the server started", [({}, time.time() - self.started)])
        _moe(w, slots)
        _spec(w, slots)
        _batch(w, slots)
        return w.text()


def _batch(w: _Writer, slots: list[Any]) -> None:
    """Continuous batching (-cb: the slots share one context, so one set of figures): steps, the sequences and
    tokens they held, compute seconds, and the averages (batch size, ubatch occupancy)."""
    for s in slots:
        get = getattr(s.llm, "batch_stats", None)
        st = get() if callable(get) else None
        if isinstance(st, dict):
            break
    else:
        return
    for name, key, kind, what in (
        ("batch_steps_total", "steps", "counter", "engine steps (ubatches) computed"),
        ("batch_sequences_total", "sequences", "counter", "sequences in those steps, summed"),
        ("batch_tokens_total", "tokens", "counter", "tokens in those steps, summed"),
        ("batch_compute_seconds_total", "compute_seconds", "counter", "seconds spent computing steps"),
        ("batch_gather_seconds_total", "gather_seconds", "counter", "seconds steps waited for active sequences"),
        ("batch_size", "sequences_per_step", "gauge", "average sequences per step"),
        ("ubatch_occupancy", "ubatch_occupancy", "gauge", "average tokens per step / n_ubatch"),
    ):
        w.add(name, kind, what, [({}, st[key])])


def _spec(w: _Writer, slots: list[Any]) -> None:
    """Speculative decoding with the MTP layer (--spec-type draft-mtp), under llama-server's names: drafted and
    accepted tokens, verification steps, accepted tokens per draft position, all slots."""
    stats = []
    for s in slots:
        get = getattr(s.llm, "spec_stats", None)
        st = get() if callable(get) else None
        if isinstance(st, dict):
            stats.append(st)
    if not stats:
        return
    for name, key, what in (
        ("spec_decode_num_draft_tokens_total", "drafted", "tokens drafted by the MTP layer"),
        ("spec_decode_num_accepted_tokens_total", "accepted", "drafted tokens the model accepted"),
        ("spec_decode_num_drafts_total", "steps", "drafts verified"),
    ):
        w.add(name, "counter", what, [({}, sum(st[key] for st in stats))])
    n_pos = max(len(st["accepted_at"]) for st in stats)
    per_pos = [sum(st["accepted_at"][i] for st in stats if i < len(st["accepted_at"])) for i in range(n_pos)]
    w.add(
        "spec_decode_num_accepted_tokens_per_pos_total",
        "counter",
        "accepted tokens per draft position",
        [({"position": i}, v) for i, v in enumerate(per_pos)],
    )


def _moe(w: _Writer, slots: list[Any]) -> None:
    samples: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    per_layer: list[tuple[dict[str, Any], Any]] = []
    for s in slots:
        get = getattr(s.llm, "moe_stats", None)
        if not callable(get):
            continue
        try:
            st = get()
        except Exception:  # a residency that cannot report must not break /metrics
            continue
        if not isinstance(st, dict):
            continue
        for key in _MOE:
            v = st.get(key)
            if isinstance(v, (bool, int, float)):
                samples.setdefault(key, []).append(({"slot": s.id}, int(v) if isinstance(v, bool) else v))
        layers = st.get("hot_per_layer")
        if isinstance(layers, (list, tuple)):
            per_layer += [({"slot": s.id, "layer": i}, n) for i, n in enumerate(layers) if isinstance(n, (int, float))]
    for key, (name, kind, help_) in _MOE.items():
        if key in samples:
            w.add(name, kind, help_, samples[key])
    if per_layer:
        w.add("moe_hot_experts_per_layer", "gauge", "hot experts per layer", per_layer)
