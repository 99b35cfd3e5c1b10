"""`Runner`: one engine context and what serves it (the thread governor, MoE expert residency or mlock, and the
engine lock), shared by the sequences evaluated on it.

Sequences (sequence.py) own tokens, logits and sampling; the runner owns the computation. An engine context
may hold several sequences (docs/batching.md); the runner's methods take the sequence's id, and `eval_batch`
evaluates the next tokens of several of them in one ubatch. With several sequences, `eval` calls of different
threads meet in the runner's Batcher (batcher.py), which merges them into such ubatches; with one, `eval` is the
engine's single-sequence evaluation under the engine lock.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from .batcher import Batcher
from .engine import runtime
from .engine.isolated import IsolatedContext
from .moe import ExpertResidency, MoEConfig, lock_all
from .moe.device import DeviceHotSets
from .speculative import MtpDrafter


class Runner:
    """An engine context (`runtime.create_context`) over its loaded model, with its thread governor (which starts
    from the CPUs free since `loading`) and, optionally, expert residency (`moe`) or the whole model locked in RAM
    (`use_mlock`). A context of several sequences gets a Batcher (`batcher`; None with one sequence): `batch_wait_ms`
    is how long a step waits for the active sequences' calls, `positions_limit` the positions all active sequences
    may hold together (kv_unified; None: each its own n_ctx). `spec_draft_n_max`: the context runs the model's MTP
    block (mtp=True) and `mtp` drafts that many tokens per step (speculative.py). `moe_prefetch` (True, False or
    "auto": on where the model is larger than 90 % of the memory the process may hold): the context asks for the
    routed experts' missing pages as soon as each layer's routing is known (docs/moe-residency.md). A context with
    hot experts on its device (`hot_experts`) gets `device_hot`, which keeps them on the first experts of the
    residency's ranking (without `moe`, a residency that counts and ranks but locks nothing)."""

    def __init__(
        self,
        model: Any,
        context: Any,
        loading: tuple[float, float | None],
        moe: MoEConfig | None = None,
        use_mlock: bool = False,
        batch_wait_ms: float = 2.0,
        positions_limit: int | None = None,
        spec_draft_n_max: int | None = None,
        moe_prefetch: bool | str = False,
    ) -> None:
        self.lock = threading.RLock()  # held while the engine computes or copies state; close() takes it
        self.context: Any = context
        self.governor = runtime.thread_governor(self.context, loading)
        self.moe: ExpertResidency | None = None
        self.mlock: Any = None
        hot = getattr(context, "hot_experts", None)  # (an RPC split's IsolatedContext has none)
        if moe is None and hot is not None:  # the device's hot experts need the routing counts, not the locking
            moe = MoEConfig(hot.count, lock=False)
        if moe is not None:
            self.moe = ExpertResidency(model, self.context.weight_range, moe, use_mlock=use_mlock and moe.lock)
            self.context.route_sink = self.moe.on_routes
        if use_mlock and (self.moe is None or not moe.lock):
            self.mlock = lock_all(self.context.weight_range, list(model.tensors))
        self.device_hot: DeviceHotSets | None = None  # the context's hot experts on its device follow the ranking
        if hot is not None and self.moe is not None:
            self.device_hot = DeviceHotSets(hot, self.moe)
        if moe_prefetch == "auto":  # on where the mapped model cannot stay in memory (and the context allows it)
            if runtime.memory_short_of(int(model.n_bytes)):
                with contextlib.suppress(ValueError):  # weights on a device: off
                    self.context.moe_prefetch = True
        elif moe_prefetch:
            self.context.moe_prefetch = True  # (a ValueError on a context whose weights are not all in host memory)
        self.mtp: MtpDrafter | None = None  # MTP drafts (a context made with mtp=True; one sequence)
        # with MTP drafts, the routing of evaluated rows waits until they are kept (a rejected draft's rows are
        # dropped by the truncation, rows evaluated again by it are not counted twice): (first position, routes)
        self._routes: list[tuple[int, npt.NDArray[Any]]] = []
        self._route_at: int | None = None  # the position of the next routed row; None: not counted
        if spec_draft_n_max is not None:
            self.mtp = MtpDrafter(context, spec_draft_n_max)
            if self.moe is not None:
                self.context.route_sink = self._route_pending
        self.batcher: Batcher | None = None
        if int(context.n_seq) > 1:
            self.batcher = Batcher(self._step, int(context.n_ubatch), batch_wait_ms / 1000.0, positions_limit)

    def prefetch_stats(self) -> dict[str, int] | None:
        """The context's moe_prefetch counters, or None when prefetch is off (or the runner is closed)."""
        ctx = self.context
        return dict(ctx.prefetch_stats()) if ctx is not None and ctx.moe_prefetch else None

    def _ctx(self) -> Any:
        if self.context is None:
            raise ValueError("this Llama has been closed")
        return self.context

    @property
    def n_ubatch(self) -> int:
        """The most tokens one graph computes."""
        return int(self._ctx().n_ubatch)

    def n_past(self, seq_id: int = 0) -> int:
        """How many positions the engine holds for the sequence."""
        return int(self._ctx().n_past_of(seq_id))

    def eval(self, seq_id: int, tokens: list[int], all_logits: bool, n_threads: int) -> npt.NDArray[np.single]:
        """Append `tokens` (checked ids, at most one batch, fitting the context) to the sequence; the logits of every
        token (`all_logits`) or of the last one. One sequence: evaluated at once, under `lock`; several: in the
        batcher's steps, together with the other sequences' calls (call it without holding `lock`)."""
        if self.batcher is not None:
            return self.batcher.eval(seq_id, tokens, all_logits, n_threads)
        with self.lock:
            ctx = self._ctx()
            self.governor.before(n_threads)
            try:
                if self.mtp is None:
                    return ctx.eval(np.asarray(tokens, np.int64), all_logits=all_logits, seq_id=seq_id)
                self.commit_routes()  # what the engine holds now is kept: a truncation came first
                self._route_at = int(ctx.n_past_of(seq_id))
                try:
                    logits = ctx.eval(np.asarray(tokens, np.int64), all_logits=all_logits, seq_id=seq_id, want_h=True)
                finally:
                    self._route_at = None
                self.mtp.after_eval(seq_id, tokens)
                return logits
            finally:
                self.governor.after()

    def draft(self, seq_id: int, held: npt.NDArray[np.intc], token: int, n_threads: int) -> list[int]:
        """The MTP block's drafts after `token`, sampled after `held` (exactly what the engine holds for the
        sequence); empty without MTP drafting. Call with `lock` held."""
        if self.mtp is None:
            return []
        self.governor.before(n_threads)
        try:
            return self.mtp.draft(seq_id, held, token)
        finally:
            self.governor.after()

    def set_active(self, seq_id: int, active: bool) -> None:
        """A completion or generation starts or ends on the sequence (its SequenceLock held exclusively): the
        batcher's steps wait briefly for the active sequences' calls (locking.SequenceLock's `on_exclusive`)."""
        if self.batcher is not None:
            self.batcher.set_active(seq_id, active)

    def claim(self, seq_id: int, n_positions: int) -> None:
        """The sequence is about to hold `n_positions`: ValueError when that exceeds what the shared context leaves
        it (`positions_limit`); nothing to check otherwise."""
        if self.batcher is not None:
            self.batcher.claim(seq_id, n_positions)

    def eval_batch(
        self, seqs: list[tuple[int, list[int]]], all_logits: bool, n_threads: int
    ) -> list[npt.NDArray[np.single]]:
        """Append tokens to several distinct sequences in one ubatch, one graph compute (`seqs`: (seq_id, tokens)
        pairs, at most n_ubatch tokens in all); each sequence's logits, of every token (`all_logits`) or of its
        last, in the order of `seqs`. Takes `lock`. ValueError, and nothing evaluated, for a bad batch."""
        with self.lock:
            ctx = self._ctx()
            self.governor.before(n_threads)
            try:
                return list(ctx.eval_batch([(s, np.asarray(t, np.int64)) for s, t in seqs], all_logits=all_logits))
            finally:
                self.governor.after()

    def _step(
        self, seqs: list[tuple[int, list[int]]], all_logits: bool, n_threads: int
    ) -> list[npt.NDArray[np.single]]:
        """The batcher's step: eval_batch, looked up at each step (a test may wrap it to watch the steps)."""
        return self.eval_batch(seqs, all_logits, n_threads)

    def truncate(self, seq_id: int, tokens: npt.NDArray[np.intc], n_threads: int) -> int:
        """Make the sequence hold exactly `tokens`, a prefix of what it holds, evaluating again only the positions
        whose state was lost (Context.truncate, docs/batching.md "Prompt reuse"); returns how many. Call with
        `lock` held."""
        ctx = self._ctx()
        self.governor.before(n_threads)
        try:
            n = int(ctx.truncate(np.asarray(tokens, np.int64), seq_id))  # (rows evaluated again: not routed again)
        finally:
            self.governor.after()
        if self.mtp is not None:
            self.mtp.reevaluated += n
            k = len(tokens)  # the routing of positions cut off (rejected drafts) is dropped
            self._routes = [(p, r[:, : max(0, k - p)]) for p, r in self._routes if p < k]
        return n

    def _route_pending(self, routes: npt.NDArray[Any], tokens: Any = None) -> None:
        """The engine's route sink with MTP drafts: keep the rows' routing until they are kept."""
        if self._route_at is None:
            return
        self._routes.append((self._route_at, routes))
        self._route_at += int(routes.shape[1])

    def commit_routes(self) -> None:
        """Hand the routing of every evaluated row the engine still holds to the expert residency (with MTP drafts,
        where it waits: Runner.eval, truncate)."""
        pending, self._routes = self._routes, []
        if self.moe is not None:
            for _, r in pending:
                if r.shape[1]:
                    self.moe.on_routes(r)

    def reset(self, seq_id: int = 0) -> None:
        """Forget the sequence's state in the engine."""
        self.commit_routes()
        self._ctx().reset(seq_id)
        if self.mtp is not None:
            self.mtp.forget(seq_id)

    def save_state(self, seq_id: int = 0) -> bytes:
        """The engine's state of the sequence, as bytes (engine/context.pyx's format)."""
        return self._ctx().save_state(seq_id)

    def check_state(self, seq_id: int, blob: bytes) -> int:
        """How many positions a saved state holds; ValueError if it does not fit this context's sequences."""
        self._ctx().n_past_of(seq_id)  # ValueError for a sequence the context does not hold
        return int(self._ctx().check_state(blob))

    def load_state(self, seq_id: int, blob: bytes) -> None:
        """Restore a state from save_state() (checked with check_state first)."""
        self.commit_routes()
        self._ctx().load_state(blob, seq_id)
        if self.mtp is not None:
            self.mtp.forget(seq_id)

    def compute_seconds(self) -> float:
        """Time the engine has spent on evaluations so far: graph building, inputs and compute."""
        ctx = self._ctx()
        return float(ctx.t_graph + ctx.t_inputs + ctx.t_compute)

    def reset_timings(self) -> None:
        """Start compute_seconds() from zero."""
        ctx = self._ctx()
        ctx.t_graph = ctx.t_inputs = ctx.t_compute = 0.0

    def close(self) -> None:
        """Save the residency statistics, unlock what is locked and free the context; a computation in another
        thread finishes first."""
        with self.lock:
            self.commit_routes()
            moe, mlock = self.moe, self.mlock
            self.moe = self.mlock = self.device_hot = None
            if self.batcher is not None:
                self.batcher.close("this Llama has been closed")
            try:
                if moe is not None:
                    moe.close()
                if mlock is not None:
                    mlock.unlock_all()
            finally:
                if isinstance(self.context, IsolatedContext):
                    self.context.close()  # its child process ends now, its connections to the servers with it
                self.context = None
                self.governor = runtime.thread_governor(None)  # it holds the context: its threads end now
