"""`Batcher`: continuous batching of the sequences of one engine context (docs/batching.md, the last section).

Each sequence is evaluated in its caller's thread (a completion, a generation, the server's slot worker). With
several sequences in one context, `Batcher.eval` hands the caller's tokens over and waits; the first waiting
caller that finds no step running leads the next step (no thread of its own):

1. it waits until every active sequence (one whose SequenceLock is held exclusively: a completion or generation
   is running on it) has work pending, or until the wait bound has passed since the step could start (the later
   of the previous step's end and the oldest pending call), so that the decode calls of running streams line up;
   the bound is `wait_s`, or a quarter of the previous step's compute time when that is longer (a sequence that
   comes back a little late costs less waited for than left to a step of its own); a sequence that missed a
   step's bound is not waited for again until its next call (a paused stream costs one bounded wait); a single
   active sequence never waits, and wait_s 0 never waits;
2. it takes every pending one-token (decode) call whole, then prompt chunks, oldest call first, up to n_ubatch
   tokens (a long prompt is split over steps);
3. it computes them in one `compute` call (Runner.eval_batch: Context.eval_batch under the engine lock), outside
   the batcher's own lock, and hands each call its rows; a call returns when its last chunk is done, with the rows
   the single-sequence path returns (every row with all_logits, else the last).

A ValueError or MemoryError of a step of several calls is retried with each call alone (nothing was evaluated):
only the calls at fault fail. Any other error fails the calls of the step. Closing fails every pending call.

`stats()` counts the steps, the sequences and tokens they held and the seconds spent computing them and gathering
their calls (the server's batch-size and ubatch-occupancy metrics).

With `limit` (kv_unified), the positions the active sequences hold together stay within it: `claim` refuses a
sequence's new length when the others' claims and it exceed the limit; a sequence that stops being active gives
its claim back (its tokens stay in the engine, for a later request's prefix).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Compute = Callable[[list[tuple[int, list[int]]], bool, int], list[npt.NDArray[np.single]]]


class _Call:
    """One caller's tokens: how many are evaluated so far, and what it gets back."""

    def __init__(self, seq_id: int, tokens: list[int], all_logits: bool, n_threads: int) -> None:
        self.seq_id, self.tokens, self.all_logits, self.n_threads = seq_id, list(tokens), all_logits, n_threads
        self.arrived = time.monotonic()
        self.offset = 0  # tokens evaluated
        self.rows: list[npt.NDArray[np.single]] = []  # the logits kept so far
        self.error: BaseException | None = None
        self.finished = False
        self.in_step = False  # being computed now (closing leaves it to the step's leader)

    def logits(self) -> npt.NDArray[np.single]:
        return self.rows[0] if len(self.rows) == 1 else np.concatenate(self.rows)


class Batcher:
    """Merge concurrent single-sequence evaluations into mixed ubatches (module docstring). `compute(seqs,
    all_logits, n_threads)` evaluates one mixed ubatch; `n_ubatch` bounds a step's tokens; `wait_s` is how long a
    step waits for active sequences' calls; `limit`: the positions all active sequences may hold together (None:
    no shared limit)."""

    WAIT_SHARE = 0.25  # of the previous step's compute time: the longest a step waits for active sequences

    def __init__(self, compute: Compute, n_ubatch: int, wait_s: float = 0.002, limit: int | None = None) -> None:
        self._compute = compute
        self.n_ubatch = n_ubatch
        self.wait_s = wait_s
        self.limit = limit
        self.max_seqs = n_ubatch  # sequences per step: lowered when a mix's graph cannot be had (MemoryError)
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Call] = []  # in arrival order
        self._active: set[int] = set()
        self._claims: dict[int, int] = {}
        self._leading = False
        self._closed: str | None = None
        self._step_end = 0.0
        self._last_compute = 0.0  # seconds, the previous step's
        self._late: set[int] = set()  # active sequences that missed a step's wait: not waited for till they call
        self._stats = {"steps": 0, "sequences": 0, "tokens": 0, "compute_seconds": 0.0, "gather_seconds": 0.0}

    # ---------------------------------------------------------------------------------------------- sequences
    def set_active(self, seq_id: int, active: bool) -> None:
        """A completion or generation starts (True) or ends (False) on the sequence; ending gives its claim back."""
        with self._cond:
            if active:
                self._active.add(seq_id)
            else:
                self._active.discard(seq_id)
                self._late.discard(seq_id)
                self._claims.pop(seq_id, None)
            self._cond.notify_all()

    def claim(self, seq_id: int, n_positions: int) -> None:
        """The sequence is about to hold `n_positions` positions: ValueError when, with what the other active
        sequences claim, that exceeds `limit` (the context shared by all sequences, kv_unified)."""
        if self.limit is None:
            return
        with self._cond:
            others = sum(n for s, n in self._claims.items() if s != seq_id)
            if others + n_positions > self.limit:
                raise ValueError(
                    f"Context size has been exceeded: this sequence needs {n_positions} positions and the other "
                    f"sequences hold {others} of the {self.limit} they share (kv_unified)"
                )
            self._claims[seq_id] = n_positions

    # ---------------------------------------------------------------------------------------------- evaluation
    def eval(self, seq_id: int, tokens: list[int], all_logits: bool, n_threads: int) -> npt.NDArray[np.single]:
        """Evaluate `tokens` (checked, fitting the sequence) after the sequence's positions, in the steps this call
        meets others in; the logits of every token (`all_logits`) or of the last, as Context.eval returns them."""
        call = _Call(seq_id, tokens, all_logits, n_threads)
        with self._cond:
            if self._closed is not None:
                raise ValueError(self._closed)
            self._pending.append(call)
            self._late.discard(seq_id)
            self._cond.notify_all()
            try:
                while not call.finished:
                    if self._leading:
                        self._cond.wait()
                        continue
                    self._leading = True
                    try:
                        self._lead()
                    finally:
                        self._leading = False
                        self._cond.notify_all()
            finally:
                if not call.finished and not call.in_step and call in self._pending:
                    self._pending.remove(call)  # this caller was interrupted: nobody waits for the call
        if call.error is not None:
            raise call.error
        return call.logits()

    def stats(self) -> dict[str, float]:
        """Steps computed, the sequences and tokens they held (sums), seconds computing them, seconds a leader
        waited for active sequences' calls, and the averages: sequences per step and ubatch occupancy (tokens
        per step / n_ubatch)."""
        with self._cond:
            st: dict[str, float] = dict(self._stats)
        steps = max(1, int(st["steps"]))
        st["sequences_per_step"] = st["sequences"] / steps
        st["ubatch_occupancy"] = st["tokens"] / steps / self.n_ubatch
        return st

    def close(self, reason: str) -> None:
        """Fail every call waiting (ValueError(reason)) and every later one."""
        with self._cond:
            self._closed = reason
            for call in list(self._pending):
                if not call.in_step:
                    self._finish(call, ValueError(reason))
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------- the leader
    def _lead(self) -> None:
        """One step (module docstring); called and returning with the lock held, released while computing."""
        t0 = time.monotonic()
        self._gather()
        self._stats["gather_seconds"] += time.monotonic() - t0
        if self._closed is not None or not self._pending:
            return
        step = self._compose()
        for call, _ in step:
            call.in_step = True
        self._cond.release()
        t0 = time.monotonic()
        try:
            results = self._run(step)
        except BaseException as e:  # the leader's thread was interrupted: the step's calls must not hang
            results = [RuntimeError(f"the step was interrupted: {type(e).__name__}")] * len(step)
            raise
        finally:
            self._cond.acquire()
            self._step_end = time.monotonic()
            self._last_compute = self._step_end - t0
            st = self._stats
            st["steps"] += 1
            st["sequences"] += len(step)
            st["tokens"] += sum(n for _, n in step)
            st["compute_seconds"] += self._step_end - t0
            for (call, n), out in zip(step, results, strict=True):
                call.in_step = False
                if isinstance(out, BaseException):
                    self._finish(call, out)
                    continue
                call.offset += n
                call.rows = [*call.rows, out] if call.all_logits else [out[-1:]]
                if call.offset == len(call.tokens):
                    self._finish(call, None)
                elif self._closed is not None:
                    self._finish(call, ValueError(self._closed))

    def _gather(self) -> None:
        """Wait (lock held) until every active sequence has a call pending, or the wait bound has passed (module
        docstring); the sequences still missing then are late."""
        bound = max(self.wait_s, self.WAIT_SHARE * self._last_compute) if self.wait_s > 0 else 0.0
        while self._closed is None and self._pending:
            missing = self._active - {c.seq_id for c in self._pending} - self._late
            if not missing:
                return
            left = max(self._step_end, self._pending[0].arrived) + bound - time.monotonic()
            if left <= 0:
                self._late |= missing
                return
            self._cond.wait(left)

    def _compose(self) -> list[tuple[_Call, int]]:
        """The next step's (call, tokens taken) pairs: decode calls whole, then prompt chunks, oldest first."""
        step: list[tuple[_Call, int]] = []
        room, seen = self.n_ubatch, set()
        for decoding in (True, False):
            for call in self._pending:
                if room <= 0 or len(step) >= self.max_seqs:
                    return step
                if (len(call.tokens) == 1) != decoding or call.seq_id in seen:
                    continue
                n = min(len(call.tokens) - call.offset, room)
                step.append((call, n))
                seen.add(call.seq_id)
                room -= n
        return step

    def _run(self, step: list[tuple[_Call, int]]) -> list[npt.NDArray[np.single] | BaseException]:
        """Compute a step: each call's rows, or the exception that concerns it."""
        seqs = [(c.seq_id, c.tokens[c.offset : c.offset + n]) for c, n in step]
        every = any(c.all_logits for c, n in step if n > 1)  # (one token: its row is the last row)
        threads = max(c.n_threads for c, _ in step)
        try:
            return list(self._compute(seqs, every, threads))
        except (ValueError, MemoryError) as e:  # nothing evaluated: each call alone finds the ones at fault
            if len(step) == 1:
                return [e]
            if isinstance(e, MemoryError):
                self.max_seqs = max(1, len(step) // 2)
            return [self._run([one])[0] for one in step]
        except Exception as e:
            return [e] * len(step)

    def _finish(self, call: _Call, error: BaseException | None) -> None:
        call.error, call.finished = error, True
        if call in self._pending:
            self._pending.remove(call)
