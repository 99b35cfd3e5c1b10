"""`Sequence`: one sequence's generation state and the only place that changes it.

A sequence is its tokens (`input_ids[:n_tokens]`), the logits it keeps (every position's with `logits_all`, else
the last one), its seed and sampler, and its share of an engine context (runner.Runner, `seq_id`). It evaluates,
samples, generates, saves and restores itself, under its lock (locking.SequenceLock), which every entry point
takes. `Llama` (llama.py) is llama-cpp-python's facade over one Sequence; completions (completion.py), chat and
the server drive a Sequence through the public methods below.

Data flow of one generation step: `steps()` evaluates pending tokens (`eval` -> `Runner.eval`, per batch), samples
from the last position's logits (`sample` -> sampling.Sampler with the grammar's mask), yields the token, and
evaluates it when resumed. A sampled token equal to the one already held at that position (a prompt that extends
what was evaluated) is not evaluated again.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator, Iterator
from collections.abc import Sequence as Tokens
from typing import Any

import numpy as np
import numpy.typing as npt

from .cache import longest_token_prefix
from .engine import runtime
from .locking import SequenceLock
from .runner import Runner
from .sampling import LogitsProcessorList, Sampler, SamplerParams, StoppingCriteriaList
from .state import LlamaState, check_state
from .tokenizer import check_token_ids


class _Fork:
    """shared_prompt()'s saved state: the prompt, the engine's state right after it, and its last logits."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.state = b""
        self.logits: npt.NDArray[np.single] | None = None


class Sequence:
    """One sequence on an engine context (module docstring).

    runner: the engine context (None: a vocabulary-only Llama, which cannot evaluate); n_ctx, n_batch: its
    positions and the tokens evaluated per engine call; logits_all: keep every position's logits (`scores`);
    grammar_state: makes a grammar's decoding state (sampling.constrained.grammar_state over the model's
    tokenizer). n_threads / n_threads_batch (one token / several), last_n_tokens_size (the penalties' window),
    seed and draft_model are plain attributes the facade may change.
    """

    def __init__(
        self,
        runner: Runner | None,
        *,
        n_ctx: int,
        n_batch: int,
        n_vocab: int,
        logits_all: bool,
        n_threads: int,
        n_threads_batch: int,
        last_n_tokens_size: int,
        seed: int,
        grammar_state: Callable[[Any], Any],
        draft_model: Any = None,
        seq_id: int = 0,
        state_size: int = 0,
    ) -> None:
        self.runner = runner
        self.seq_id = seq_id
        self.n_ctx, self.n_batch, self.n_vocab = n_ctx, n_batch, n_vocab
        self.logits_all = logits_all
        self.n_threads, self.n_threads_batch = n_threads, n_threads_batch
        self.last_n_tokens_size = last_n_tokens_size
        self.seed = seed
        self.draft_model = draft_model
        self.lock = SequenceLock(functools.partial(runner.set_active, seq_id) if runner is not None else None)
        self._grammar_state = grammar_state
        self._state_size = state_size  # bytes of one saved engine state (shared_prompt's budget)
        self.n_tokens = 0
        self.input_ids: npt.NDArray[np.intc] = np.ndarray((n_ctx,), dtype=np.intc)
        self.scores: npt.NDArray[np.single] = np.zeros((n_ctx if logits_all else n_batch, n_vocab), dtype=np.single)
        self.last_logits: npt.NDArray[np.single] | None = None
        self.requires_eval = False  # the held logits are not those of the last position (a restored state)
        self._recent: tuple[int, npt.NDArray[np.single]] | None = None  # (first position, logits) of a drafted eval
        self._sampler: Sampler | None = None
        self._fork: _Fork | None = None  # see shared_prompt

    # ---------------------------------------------------------------------------------------------- reading
    @property
    def tokens(self) -> npt.NDArray[np.intc]:
        """The sequence's tokens (a view of input_ids[:n_tokens])."""
        return self.input_ids[: self.n_tokens]

    def logits_at(self, idx: int | None = None) -> npt.NDArray[np.single]:
        """The logits of position `idx` (None: the last evaluated); earlier positions need logits_all."""
        if idx is None or idx == self.n_tokens - 1:
            if self.last_logits is None:
                raise ValueError("no logits: evaluate tokens first")
            return self.last_logits
        recent = self._recent  # a drafted evaluation's rows: readable while they are held
        held = recent is not None and recent[0] <= idx < min(recent[0] + len(recent[1]), self.n_tokens)
        if held and not self.logits_all:
            return recent[1][idx - recent[0]]  # type: ignore[index]
        if not self.logits_all:
            raise ValueError("logits of earlier positions need logits_all=True")
        return self.scores[idx]

    def check_usable(self) -> None:
        """ValueError when the sequence cannot evaluate: its Llama is closed, or has only a vocabulary."""
        self._runner()

    def _runner(self) -> Runner:
        if self.lock.closed:
            raise ValueError("this Llama has been closed")
        if self.runner is None:
            raise ValueError("this Llama was created with vocab_only=True: it cannot evaluate tokens")
        return self.runner

    # ---------------------------------------------------------------------------------------------- evaluation
    def reset(self) -> None:
        """Forget the evaluated sequence (the next eval starts at position 0)."""
        with self.lock.serial():
            self.n_tokens = 0

    def eval(self, tokens: Tokens[int], all_logits: bool = False) -> None:
        """Evaluate tokens after the first n_tokens (anything evaluated beyond n_tokens is discarded first); with
        all_logits, every position's logits are readable (logits_at) until the next evaluation."""
        with self.lock.serial():
            runner = self._runner()
            tokens = check_token_ids(tokens, self.n_vocab)
            if not tokens:
                return
            if self.n_tokens + len(tokens) > self.n_ctx:
                n = self.n_tokens + len(tokens)
                raise ValueError(f"Requested tokens ({n}) exceed context window of {self.n_ctx}")
            with runner.lock:
                self._sync()
            self._recent = None
            for i in range(0, len(tokens), self.n_batch):
                self._append(tokens[i : i + self.n_batch], self.logits_all or all_logits)
            self.requires_eval = False

    def decode(self, tokens: list[int], all_logits: bool) -> npt.NDArray[np.single]:
        """Evaluate one batch of checked token ids (at most n_batch, fitting n_ctx) after the first n_tokens: the
        logits of every token (`all_logits` or logits_all) or of the last one (llama_decode's path)."""
        runner = self._runner()
        with self.lock.serial():
            with runner.lock:
                self._sync()
            return self._append(tokens, all_logits)

    def _sync(self) -> None:
        """Make the engine's sequence equal input_ids[:n_tokens] (it may be longer after a truncation, or after an
        evaluation that failed part-way); the caller holds the runner's lock."""
        runner = self._runner()
        held = runner.n_past(self.seq_id)
        if held == self.n_tokens:
            return
        if held > self.n_tokens:
            runner.truncate(self.seq_id, self.tokens, self.n_threads_batch)
            return
        # the engine lost the sequence's state (a split whose RPC part failed and connected again,
        # engine/isolated.py): evaluate its tokens again
        tokens = [int(t) for t in self.input_ids[held : self.n_tokens]]
        step = int(runner.context.n_ubatch)
        for i in range(0, len(tokens), step):
            runner.eval_batch([(self.seq_id, tokens[i : i + step])], False, self.n_threads_batch)

    def _append(self, batch: list[int], all_logits: bool) -> npt.NDArray[np.single]:
        """Evaluate `batch` after n_tokens of a synced sequence; the caller holds the sequence, not the runner's
        lock (Runner.eval takes it, or meets the other sequences' calls in its batcher)."""
        n_past = self.n_tokens
        threads = self.n_threads_batch if len(batch) > 1 else self.n_threads
        runner = self._runner()
        runner.claim(self.seq_id, n_past + len(batch))
        ids, scores = self.input_ids, self.scores  # (a close() meanwhile replaces them)
        logits = runner.eval(self.seq_id, batch, all_logits or self.logits_all, threads)
        self._record(n_past, batch, logits, all_logits, ids, scores)
        return logits

    def _record(
        self,
        n_past: int,
        batch: list[int],
        logits: npt.NDArray[np.single],
        all_logits: bool,
        ids: npt.NDArray[np.intc],
        scores: npt.NDArray[np.single],
    ) -> None:
        """`batch` was evaluated after n_past: keep its tokens and logits (into the arrays taken before the
        evaluation: a close() meanwhile replaces them)."""
        ids[n_past : n_past + len(batch)] = batch
        if self.logits_all:
            scores[n_past : n_past + len(batch), :] = logits
        elif all_logits and len(batch) > 1:
            self._recent = (n_past, logits)
        self.last_logits = logits[-1]
        self.n_tokens = n_past + len(batch)

    # ---------------------------------------------------------------------------------------------- sampling
    def sampler(
        self,
        logits_processor: LogitsProcessorList | None = None,
        grammar: Any = None,
        tfs_z: float = 1.0,
        penalize_nl: bool = True,
        **params: Any,
    ) -> Sampler:
        """A sampler over this sequence's seed and penalty window. `params`: llama-cpp-python's sampling keywords,
        which are SamplerParams' fields (top_k, top_p, min_p, typical_p, temp, penalties, mirostat_*); tfs_z and
        penalize_nl, which llama.cpp dropped, are accepted and have no effect."""
        state = self._grammar_state(grammar) if grammar is not None else None
        settings = SamplerParams(**params, penalty_last_n=self.last_n_tokens_size)
        return Sampler(settings, seed=self.seed, logits_processor=logits_processor, grammar=state)

    def sample(self, idx: int | None = None, **sampling: Any) -> int:
        """Sample a token from the logits of position `idx` (default: the last evaluated), with the running
        generation's sampler, or one made from `sampling` (sampler()'s keywords)."""
        if self.lock.closed:
            raise ValueError("this Llama has been closed")
        if self.n_tokens <= 0:
            raise ValueError("sample needs evaluated tokens: call eval first")
        sampler = self._sampler or self.sampler(**sampling)
        return sampler.sample(self.logits_at(idx), self.tokens)

    def generate(self, tokens: Tokens[int], **kw: Any) -> Generator[int, Tokens[int] | None, None]:
        """steps() holding the sequence until the generator is finished or closed (other threads wait)."""
        return self.lock.relay(self.steps(tokens, **kw))

    def steps(
        self,
        tokens: Tokens[int],
        reset: bool = True,
        stopping_criteria: StoppingCriteriaList | None = None,
        **sampling: Any,
    ) -> Generator[int, Tokens[int] | None, None]:
        """Yield sampled tokens until a stopping criterion says so (else forever: the caller stops). A prompt that
        extends what was evaluated reuses it; a sampled token is evaluated when the generator is resumed;
        `.send(tokens)` appends more tokens. The caller holds the sequence (lock.relay / lock.exclusive)."""
        self._runner()
        self._sampler = self.sampler(**sampling)
        tokens = list(tokens)
        fork, prompt = (self._fork if reset and tokens else None), tokens
        if fork is not None and fork.tokens == prompt:
            self._resume(fork)
            fork = None  # (nothing to save)
        if reset and self.n_tokens > 0:
            prefix = longest_token_prefix(self.tokens.tolist(), tokens)
            consumed = prefix == len(tokens)
            if self.n_tokens == len(tokens) and consumed and not self.requires_eval:
                reset, tokens = False, []  # the whole prompt is already evaluated: sample right away
            else:
                keep = prefix - 1 if consumed else prefix  # re-evaluate at least one token for fresh logits
                if keep > 0:
                    reset = False
                    tokens = tokens[keep:]
                    self.n_tokens = keep
                    self.requires_eval = True
        if reset:
            self.reset()
        sample_idx = self.n_tokens + len(tokens) - 1
        runner = self._runner()
        mtp = self.draft_model is None and runner.mtp is not None
        try:
            while True:
                self.eval(tokens, all_logits=mtp)
                if fork is not None:  # the prompt is evaluated now: saved for the next answer to it
                    self._fork_here(fork, prompt)
                    fork = None
                while sample_idx < self.n_tokens:
                    token = self.sample(idx=sample_idx)
                    sample_idx += 1
                    if stopping_criteria is not None and stopping_criteria(
                        self.input_ids[:sample_idx], self.logits_at(sample_idx - 1)
                    ):
                        return
                    more = yield token
                    tokens = [token, *(more or [])]
                    if sample_idx < self.n_tokens and token != self.input_ids[sample_idx]:
                        self.n_tokens = sample_idx
                        self.requires_eval = True
                        break
                if self.draft_model is not None:
                    self.input_ids[self.n_tokens : self.n_tokens + len(tokens)] = tokens
                    draft = self.draft_model(self.input_ids[: self.n_tokens + len(tokens)])
                    tokens.extend(np.asarray(draft).astype(int)[: self.n_ctx - self.n_tokens - len(tokens)].tolist())
                elif mtp and len(tokens) == 1:  # the model's MTP block drafts; the next eval verifies
                    with runner.lock:
                        self._sync()
                        tokens.extend(runner.draft(self.seq_id, self.tokens, tokens[0], self.n_threads))
        finally:
            self._sampler = None

    # ---------------------------------------------------------------------------------------------- shared prompts
    @contextlib.contextmanager
    def shared_prompt(self) -> Iterator[None]:
        """Several answers to one prompt (the server's `n`): within, a generation whose whole prompt is the one the
        previous generation in here evaluated restarts from the state saved right after that prompt, so the prompt
        is evaluated once, not once per answer. Holds a copy of the engine state (its size follows n_ctx) while
        open, only where it takes at most a quarter of the available memory (else each answer evaluates the
        prompt again)."""
        room = runtime.available_host_memory()
        self._fork = _Fork() if room is None or 4 * self._state_size <= room else None
        try:
            yield
        finally:
            self._fork = None

    def _fork_here(self, fork: _Fork, prompt: list[int]) -> None:
        """Save the state after `prompt` (evaluated just now) in `fork`."""
        if self.n_tokens != len(prompt) or self.last_logits is None:
            return
        runner = self._runner()
        with runner.lock:
            self._sync()
            fork.tokens, fork.state = [], runner.save_state(self.seq_id)
            fork.logits = self.last_logits.copy()
            fork.tokens = prompt

    def _resume(self, fork: _Fork) -> None:
        """Go back to the state saved in `fork`: its prompt evaluated, its logits those to sample from."""
        runner = self._runner()
        with self.lock.serial(), runner.lock:
            runner.load_state(self.seq_id, fork.state)
            n = len(fork.tokens)
            self.input_ids[:n] = fork.tokens
            self.n_tokens = n
            self.last_logits = fork.logits
            self.requires_eval = False  # the logits of the last prompt position are the saved ones

    # ---------------------------------------------------------------------------------------------- state
    def save_state(self) -> LlamaState:
        """A snapshot of the evaluation state: every field is read while the engine is held, so a state saved while
        another thread evaluates is one moment of the sequence."""
        runner = self._runner()
        with self.lock.serial(changes_sequence=False), runner.lock:
            self._sync()
            n = self.n_tokens
            blob = runner.save_state(self.seq_id)
            if self.logits_all:
                scores = self.scores[:n].copy()
            elif n and self.last_logits is not None:
                scores = self.last_logits[None, :].copy()
            else:
                scores = np.zeros((0, self.n_vocab), np.single)
            return LlamaState(
                input_ids=self.input_ids.copy(),
                scores=scores,
                n_tokens=n,
                llama_state=blob,
                llama_state_size=len(blob),
                seed=self.seed,
            )

    def load_state(self, state: LlamaState) -> None:
        """Restore a state from save_state(). It is checked whole first: a state of another sequence (model,
        n_ctx, n_ubatch, cache type, logits_all) or a damaged one is a ValueError naming the mismatch, and changes
        nothing."""
        runner = self._runner()
        with self.lock.serial(), runner.lock:
            n, ids, scores, seed = check_state(state, self.n_ctx, self.n_vocab, self.logits_all)
            held = runner.check_state(self.seq_id, state.llama_state)
            if held != n:
                raise ValueError(f"not a state of this Llama: it says {n} tokens, but its engine state holds {held}")
            runner.load_state(self.seq_id, state.llama_state)
            self.input_ids[:n] = ids[:n]
            self.n_tokens = n
            if self.logits_all:
                self.scores[:n] = scores[:n]
            self.last_logits = (scores[n - 1] if len(scores) >= n else scores[-1]).copy() if n else None
            self.seed = seed
            self.requires_eval = True  # a restored state must be re-evaluated before an exact-match sample

    def close(self) -> None:
        """Drop the buffers (scores is n_ctx x n_vocab floats with logits_all); later calls say "closed"."""
        self.lock.closed = True
        self.n_tokens = 0
        self.input_ids = np.zeros(0, np.intc)
        self.scores = np.zeros((0, self.n_vocab), np.single)
        self.last_logits = self._sampler = None


def decode_together(parts: list[tuple[Sequence, list[int], bool]]) -> list[npt.NDArray[np.single]]:
    """Evaluate tokens on several distinct sequences of one engine context in mixed ubatches (the low-level
    llama_decode of a batch of several sequences): `parts` are (sequence, checked tokens fitting it, all_logits);
    each step takes a chunk of every sequence with tokens left, up to n_ubatch tokens in all. Returns each
    sequence's logits (every token's with all_logits or its logits_all, else its last token's), in the order of
    parts. An error part-way leaves the engine ahead of the sequences, which their next evaluation cuts back."""
    seqs = [p[0] for p in parts]
    runner = seqs[0]._runner()
    if any(s._runner() is not runner for s in seqs) or len({s.seq_id for s in seqs}) != len(seqs):
        raise ValueError("decode_together needs distinct sequences of one context")
    want = [every or s.logits_all for s, _, every in parts]
    decoding = all(len(t) == 1 for _, t, _ in parts)  # one token each: generation's threads, else the batch's
    n_threads = max(s.n_threads if decoding else s.n_threads_batch for s in seqs)
    with contextlib.ExitStack() as held:
        for s in sorted(seqs, key=lambda s: s.seq_id):  # one order for every caller: no deadlock
            held.enter_context(s.lock.serial())
        with runner.lock:
            for s in seqs:
                s._sync()
        past = [s.n_tokens for s in seqs]
        for s, (_, toks, _) in zip(seqs, parts, strict=True):
            runner.claim(s.seq_id, s.n_tokens + len(toks))
        arrays = [(s.input_ids, s.scores) for s in seqs]
        rows: list[list[npt.NDArray[np.single]]] = [[] for _ in parts]
        done = [0] * len(parts)
        n_ubatch = runner.n_ubatch
        while True:
            step, room = [], n_ubatch
            for i, (_, toks, _) in enumerate(parts):
                if done[i] < len(toks) and room > 0:
                    n = min(len(toks) - done[i], room)
                    step.append((i, n))
                    room -= n
            if not step:
                break
            every = any(want[i] for i, _ in step)
            out = runner.eval_batch([(seqs[i].seq_id, parts[i][1][done[i] : done[i] + n]) for i, n in step], every,
                                    n_threads)  # fmt: skip
            for (i, n), lg in zip(step, out, strict=True):
                rows[i].append(lg if want[i] else lg[-1:])
                done[i] += n
        result = []
        for i, (s, toks, _) in enumerate(parts):
            logits = rows[i][-1] if not want[i] or len(rows[i]) == 1 else np.concatenate(rows[i])
            s._record(past[i], toks, logits, want[i], *arrays[i])
            result.append(logits)
        return result
