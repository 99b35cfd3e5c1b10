"""`Batcher`: the evaluations of several sequences of one engine context, merged into shared ubatches.

Continuous batching without a scheduler thread (docs/batching.md): each sequence's thread calls `eval(seq_id,
tokens, ...)` as it would evaluate alone, and waits. The first waiting caller that finds no step running leads the
next step: it takes the pending work (every single-token call whole, then prompt chunks, oldest call first, up to
n_ubatch tokens), computes it as one `eval_batch`, gives each call its rows' logits and wakes the others; a call
whose tokens are not all evaluated yet stays pending for the next step. Nothing above the runner changes: sampling,
grammars, stops and streaming stay in each request's own thread.

A step waits, at most `wait_s` after its oldest pending call, until every *active* sequence (one inside a
generation: `activate` / `deactivate`) has work pending, so that the decode steps of running streams line up in
one ubatch instead of alternating. An error in a step reaches the calls of that step, and only those.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# evaluates [(seq_id, tokens)] in one ubatch with every row's logits or the last of each, with n threads
EvalBatch = Callable[[list[tuple[int, list[int]]], bool, int], list[npt.NDArray[np.single]]]


@dataclass
class _Call:
    seq_id: int
    tokens: list[int]
    all_logits: bool
    n_threads: int
    since: float
    done: int = 0
    logits: list[npt.NDArray[np.single]] = field(default_factory=list)
    error: BaseException | None = None
    finished: bool = False


@dataclass
class BatchStats:
    """What the batcher has done: steps computed, rows (tokens) evaluated, and the most sequences in one step."""

    steps: int = 0
    rows: int = 0
    most_sequences: int = 0


class Batcher:
    """Merges concurrent evaluations of distinct sequences into steps of at most `n_ubatch` tokens (module
    docstring). `eval_batch` computes one step; `wait_s` bounds how long a step waits for active sequences."""

    def __init__(self, eval_batch: EvalBatch, n_ubatch: int, wait_s: float = 0.002) -> None:
        self._eval_batch = eval_batch
        self.n_ubatch = n_ubatch
        self.wait_s = wait_s
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._active: dict[int, int] = {}  # seq_id -> open generations
        self._leading = False
        self._seqs_busy: set[int] = set()

    # ---------------------------------------------------------------------------------------------- active sequences
    def activate(self, seq_id: int) -> None:
        """A generation on `seq_id` begins: steps wait (briefly) for its next call."""
        with self._cv:
            self._active[seq_id] = self._active.get(seq_id, 0) + 1

    def deactivate(self, seq_id: int) -> None:
        """The generation on `seq_id` ended: steps no longer wait for it."""
        with self._cv:
            n = self._active.get(seq_id, 0) - 1
            if n > 0:
                self._active[seq_id] = n
            else:
                self._active.pop(seq_id, None)
            self._cv.notify_all()

    # ---------------------------------------------------------------------------------------------- evaluation
    def eval(self, seq_id: int, tokens: list[int], all_logits: bool, n_threads: int) -> npt.NDArray[np.single]:
        """Append `tokens` to sequence `seq_id` in as many shared steps as they need; the logits of every token
        (`all_logits`) or of the last one, as the context's own eval returns them."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        call = _Call(seq_id, list(tokens), all_logits, n_threads, time.monotonic())
        with self._cv:
            if seq_id in self._seqs_busy:
                raise RuntimeError(f"sequence {seq_id} is already being evaluated by another call")
            self._seqs_busy.add(seq_id)
            self._pending.append(call)
            self._cv.notify_all()
            try:
                while not call.finished:
                    if self._leading:
                        self._cv.wait()
                        continue
                    self._leading = True
                    try:
                        self._lead()
                    finally:
                        self._leading = False
                        self._cv.notify_all()
            finally:
                self._seqs_busy.discard(seq_id)
                if not call.finished:  # interrupted while waiting (KeyboardInterrupt): no longer pending
                    self._pending = [c for c in self._pending if c is not call]
        if call.error is not None:
            raise call.error
        if all_logits:
            return call.logits[0] if len(call.logits) == 1 else np.concatenate(call.logits)
        return call.logits[-1]

    def _lineup(self) -> None:
        """Wait (holding the condition, released while waiting) until every active sequence has a call pending, or
        wait_s after the oldest pending call."""
        while self._pending:
            waiting = {c.seq_id for c in self._pending}
            if all(s in waiting for s in self._active):
                return
            left = self._pending[0].since + self.wait_s - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _take(self) -> list[tuple[_Call, list[int]]]:
        """The next step: every pending single-token call, then chunks of the others, oldest first, within
        n_ubatch tokens."""
        step: list[tuple[_Call, list[int]]] = []
        room = self.n_ubatch
        for c in self._pending:
            if len(c.tokens) - c.done == 1 and room > 0:
                step.append((c, c.tokens[c.done :]))
                room -= 1
        for c in self._pending:
            left = len(c.tokens) - c.done
            if left > 1 and room > 0:
                n = min(left, room)
                step.append((c, c.tokens[c.done : c.done + n]))
                room -= n
        return step

    def _lead(self) -> None:
        """Compute one step (called holding the condition; released during the computation)."""
        self._lineup()
        step = self._take()
        if not step:
            return
        want_all = any(c.all_logits for c, _ in step)
        threads = max(c.n_threads for c, _ in step)
        self._cv.release()
        try:
            try:
                out: list[npt.NDArray[np.single]] | None = self._eval_batch(
                    [(c.seq_id, chunk) for c, chunk in step], want_all, threads
                )
                error: BaseException | None = None
            except BaseException as e:  # handed to the calls of this step
                out, error = None, e
        finally:
            self._cv.acquire()
        self.stats.steps += 1
        self.stats.rows += sum(len(chunk) for _, chunk in step)
        self.stats.most_sequences = max(self.stats.most_sequences, len(step))
        for i, (c, chunk) in enumerate(step):
            if out is None:
                c.error, c.finished = error, True
                continue
            rows = out[i]
            c.logits.append(rows if c.all_logits or not want_all else rows[-1:])
            c.done += len(chunk)
            c.finished = c.done == len(c.tokens)
            if not c.all_logits and not c.finished:
                c.logits.clear()  # only the last chunk's last row is returned
        self._pending = [c for c in self._pending if not c.finished]
