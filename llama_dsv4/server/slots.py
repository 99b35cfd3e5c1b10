"""Concurrency: slots, the queue in front of them, and jobs that can be stopped.

A slot is one `Llama` with one worker thread: everything that touches that Llama runs on that thread, one job at a
time. With continuous batching (--parallel N, the default) the slots are the N sequences of one context
(`Llama(n_seq_max=N)` and its `slot(i)`), whose workers' tokens the engine evaluates together; with
--no-cont-batching each slot is a Llama of its own (the weights are the same memory-mapped file, so N slots share
their pages).
Requests wait for a free slot in arrival order (the queue whose depth /metrics reports); among free slots a
request takes the one whose last request's prompt shares the longest prefix with its own (`SlotPool.enqueue`), so
a chat's next turn lands where its earlier turns are held and reuses them. A job runs a completion
on the slot's thread and hands its chunks to the event loop; it is stopped at the next token when its client goes
away (`Job.cancel`), and the slot is free again as soon as the worker returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cache import longest_token_prefix
from ..chat.handlers import TemplateChatHandler, resolve_handler, template_from_file
from ..chat.registry import LlamaChatCompletionHandlerNotFoundException
from ..sampling import LogitsProcessorList
from .settings import Settings

log = logging.getLogger("llama_dsv4.server")

SLOT_PROMPT_SIMILARITY = 0.1  # llama-server's default --slot-prompt-similarity


class Cancelled(Exception):
    """Raised inside generation (from the job's logits processor) to stop it at the next token."""


class Controller:
    """The job's hook into generation, as a logits processor: stops it when cancelled, and counts and times the
    prompt (its length at the first sampled token) and the sampled tokens."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.n_prompt = 0
        self.n_sampled = 0
        self.choice_prompt = 0  # the prompt length of the current choice (several choices: see new_choice)
        self._new_choice = False
        self.usage: dict[str, int] | None = None  # what a job of several streamed choices counted

    def new_choice(self) -> None:
        """A job of several choices starts the next one: its prompt length is noted at its first sample."""
        self._new_choice = True

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.cancelled.is_set():
            raise Cancelled
        now = time.perf_counter()
        if self._new_choice:
            self.choice_prompt, self._new_choice = len(input_ids), False
        if self.t_first is None:
            self.t_first, self.n_prompt = now, len(input_ids)
        self.t_last = now
        self.n_sampled += 1
        return scores

    def processors(self) -> LogitsProcessorList:
        return LogitsProcessorList([self])


@dataclass
class Slot:
    id: int
    llm: Any  # a Llama, or a stand-in with the same methods
    n_ctx: int
    executor: ThreadPoolExecutor = field(repr=False)
    job: Job | None = None
    n_jobs: int = 0
    prompt: Any = None  # the prompt key of the last request handed this slot (SlotPool.enqueue)


@dataclass
class JobStats:
    n_prompt: int
    n_predicted: int
    t_prompt: float
    t_predict: float
    cancelled: bool


class Job:
    """One completion on one slot. `fn(llm, controller)` returns the response (a dict) or, for streams, an
    iterator of chunks; events reach the loop as ("chunk" | "result" | "error" | "cancelled" | "end", value)."""

    AHEAD = 32

    def __init__(self, slot: Slot, fn: Callable[[Any, Controller], Any], stream: bool) -> None:
        self.slot = slot
        self.fn = fn
        self.stream = stream
        self.ctl = Controller()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._room = threading.Semaphore(self.AHEAD)  # chunks the worker may be ahead of the loop
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.finished = threading.Event()  # set by the worker when it returns
        self.stats: JobStats | None = None
        self._loop = asyncio.get_running_loop()
        # set on the loop once the slot is released: a response waits for it, so a client holding its whole answer
        # sees the slot idle (/health, /slots, metrics), as llama-server's clients do
        self.released = asyncio.Event()

    def cancel(self) -> None:
        self.ctl.cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self.ctl.cancelled.is_set()

    def _put(self, kind: str, value: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def run(self) -> None:
        """The worker: runs on the slot's thread."""
        cancelled = False
        try:
            result = self.fn(self.slot.llm, self.ctl)
            if not self.stream:
                self._note_finish(result)
                self._put("result", result)
            else:
                try:
                    for chunk in result:
                        self._note_finish(chunk)
                        if not self._wait_for_room():
                            cancelled = True
                            break
                        self._put("chunk", chunk)
                        if self.ctl.cancelled.is_set():
                            cancelled = True
                            break
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        except Cancelled:
            cancelled = True
            self._put("cancelled")
        except Exception as e:
            self._put("error", e)
        finally:
            c = self.ctl
            t_end = time.perf_counter()
            n_pred, n_prompt = c.n_sampled, c.n_prompt
            usage = self.usage or c.usage
            if usage is not None:
                n_pred, n_prompt = usage["completion_tokens"], usage["prompt_tokens"]
            elif self.finish_reason in ("stop", "tool_calls") and n_pred:
                n_pred -= 1  # the end-of-text token is not counted (after a stop string this is one short)
            self.stats = JobStats(
                n_prompt=n_prompt,
                n_predicted=n_pred,
                t_prompt=(c.t_first or t_end) - c.t_start,
                t_predict=t_end - (c.t_first or t_end),
                cancelled=cancelled,
            )
            self._put("end")
            self.finished.set()

    def _note_finish(self, item: Any) -> None:
        with contextlib.suppress(Exception):
            reason = item["choices"][0]["finish_reason"]
            if reason is not None:
                self.finish_reason = reason
        with contextlib.suppress(Exception):
            u = item["usage"]
            self.usage = {"prompt_tokens": int(u["prompt_tokens"]), "completion_tokens": int(u["completion_tokens"])}

    def _wait_for_room(self) -> bool:
        """Backpressure: wait while AHEAD chunks are not yet taken by the loop (a client that stops reading a
        stream pauses its generation instead of piling up chunks). False if the job was cancelled meanwhile."""
        while not self._room.acquire(timeout=0.1):
            if self.ctl.cancelled.is_set():
                return False
        return True

    async def next_event(self) -> tuple[str, Any]:
        kind, value = await self.events.get()
        if kind == "chunk":
            self._room.release()
        return kind, value


def overlap(held: Any, prompt: Any) -> tuple[int, int]:
    """(how much of the prompt key `prompt` its longest common prefix with `held` covers, how much there is): the
    characters of a text, the tokens of token ids, the characters of the whole messages a chat (a tuple of its
    messages as JSON) shares from its first one on."""
    if isinstance(prompt, tuple):
        shared = 0
        if isinstance(held, tuple):
            for a, b in zip(held, prompt, strict=False):
                if a != b:
                    break
                shared += len(b)
        return shared, sum(len(m) for m in prompt)
    return (longest_token_prefix(held, prompt) if type(held) is type(prompt) else 0), len(prompt)


class SlotPool:
    """Slots handed out first come, first served; `waiting` is the queue depth. `similarity` is llama-server's
    --slot-prompt-similarity (0: off; see enqueue)."""

    def __init__(
        self,
        llamas: list[tuple[Any, int]],
        on_job_end: Callable[[Job], None] | None = None,
        similarity: float = SLOT_PROMPT_SIMILARITY,
    ) -> None:
        self.slots = [
            Slot(i, llm, n_ctx, ThreadPoolExecutor(1, thread_name_prefix=f"slot{i}"))
            for i, (llm, n_ctx) in enumerate(llamas)
        ]
        self._free: deque[Slot] = deque(self.slots)  # the slot free the longest first
        self._waiters: deque[asyncio.Future[Slot]] = deque()
        self._prompts: dict[asyncio.Future[Slot], Any] = {}  # the prompt key of each waiter
        self.on_job_end = on_job_end
        self.similarity = similarity
        self.closed = False

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    def enqueue(self, prompt: str | list[int] | tuple[str, ...] | None = None) -> asyncio.Future[Slot]:
        """Take a place in the queue now (synchronously, so the queue depth counts this request at once); the
        future is done when a slot is handed over. Await it through `wait`.

        `prompt` is the request's prompt key (the prompt text or tokens of a completion, a tuple of the messages as
        JSON of a chat). Where several slots are free, the request gets the one whose last request's key shares the
        longest prefix with it (`overlap`), if that prefix is more than `similarity` of its key (llama-server's
        rule, over the request's text instead of its tokens); else, and always for a waiting request, the slot free
        the longest. A slot keeps the tokens of its last request, so the one chosen reuses the shared prefix."""
        if self.closed:
            raise RuntimeError("the server is shutting down")
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        if self._free and not self.waiting:
            fut.set_result(self._hand(self._most_similar(prompt), prompt))
        else:
            self._waiters.append(fut)
            self._prompts[fut] = prompt
        return fut

    def _most_similar(self, prompt: Any) -> Slot:
        best, best_n = self._free[0], 0
        if prompt and self.similarity > 0:
            for slot in self._free:
                n, total = overlap(slot.prompt, prompt)
                if n > best_n and n > self.similarity * total:
                    best, best_n = slot, n
        return best

    def _hand(self, slot: Slot, prompt: Any) -> Slot:
        self._free.remove(slot)
        slot.prompt = prompt
        return slot

    @staticmethod
    async def wait(fut: asyncio.Future[Slot]) -> Slot:
        return await asyncio.shield(fut)  # cancelling the waiter leaves the place to `abandon`

    def abandon(self, fut: asyncio.Future[Slot]) -> None:
        """Give up a place whose slot was never put to work: out of the queue, or the slot handed on."""
        if fut.done() and not fut.cancelled():
            self.release(fut.result())
        else:
            fut.cancel()
            self._prompts.pop(fut, None)
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def release(self, slot: Slot) -> None:
        slot.job = None
        while self._waiters:
            w = self._waiters.popleft()
            prompt = self._prompts.pop(w, None)
            if not w.done():
                slot.prompt = prompt
                w.set_result(slot)
                return
        self._free.append(slot)

    def start(
        self, slot: Slot, fn: Callable[[Any, Controller], Any], stream: bool, then: Callable[[], None] | None = None
    ) -> Job:
        """Run `fn` on the slot's thread; the slot is released when it returns (not before), and `then` called."""
        job = Job(slot, fn, stream)
        slot.job = job
        slot.n_jobs += 1
        fut = asyncio.get_running_loop().run_in_executor(slot.executor, job.run)

        def done(_: Any) -> None:
            if self.on_job_end is not None:
                try:
                    self.on_job_end(job)
                except Exception:  # metrics must never take a slot down
                    log.exception("recording a job's metrics failed")
            self.release(slot)
            job.released.set()
            if then is not None:
                then()

        fut.add_done_callback(done)
        return job

    def close(self, wait_s: float = 5.0) -> bool:
        """At shutdown: stop running jobs (at their next token), wait up to `wait_s` for them, and release the
        models of the idle slots. Returns False if a job is still running (a long prompt cannot be interrupted)."""
        self.closed = True
        for w in self._waiters:
            if not w.done():
                w.cancel()
        for s in self.slots:
            if s.job is not None:
                s.job.cancel()
        deadline = time.monotonic() + wait_s
        idle = True
        for s in reversed(self.slots):  # (slot 0 last: with continuous batching it owns the others' context)
            s.executor.shutdown(wait=False, cancel_futures=True)
            job = s.job
            if job is not None and not job.finished.wait(max(0.0, deadline - time.monotonic())):
                idle = False
                continue
            close = getattr(s.llm, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        return idle


def fit_context(settings: Settings, n_ctx_train: int) -> tuple[int, list[str]]:
    """Each slot's context: --ctx-size (0: the model's) clamped to the trained context, shared by the slots as
    llama-server shares it (--kv-unified: each slot may use all of it). Returns (tokens per slot, notes)."""
    notes = []
    total = settings.n_ctx or n_ctx_train
    if total > n_ctx_train:
        notes.append(f"--ctx-size {total} is more than the model's trained context: using {n_ctx_train}")
        total = n_ctx_train
    per_slot = total if settings.kv_unified else total // settings.parallel
    if settings.parallel > 1:
        shared = f", and the running requests {total} together (--kv-unified)" if settings.kv_unified else ""
        notes.append(f"--parallel {settings.parallel}: each slot has a context of {per_slot} tokens{shared}")
    if per_slot < 16:
        raise ValueError(f"a context of {per_slot} tokens per slot is too small (--ctx-size / --parallel)")
    return per_slot, notes


def resolve_model(settings: Settings) -> str:
    """The local path of the model: --model, or --hf-repo downloaded (all shards) as Llama.from_pretrained does."""
    if settings.model:
        return settings.model
    from ..hub import download

    return download(settings.hf_repo or "", settings.hf_file or "", token=settings.hf_token)


def load_slots(settings: Settings) -> tuple[list[tuple[Any, int]], list[str]]:
    """Open the model: once, into a context of --parallel sequences (continuous batching), or once per slot
    (--no-cont-batching: the weights are mapped, not copied, where the device can read host memory)."""
    from ..llama import Llama
    from ..model.loader import load_model

    path = resolve_model(settings)
    model = load_model(path)
    try:
        n_ctx_train = model.params.n_ctx_train
    finally:
        model.close()
    n_ctx, notes = fit_context(settings, n_ctx_train)
    kwargs = settings.llama_kwargs()
    kwargs["n_ctx"] = n_ctx
    if settings.parallel > 1 and settings.cont_batching:
        return _load_sequences(path, kwargs, settings), notes
    if settings.parallel > 1:
        notes.append(
            "slots share the mapped weights on CPU and Metal; with --no-mmap, or on a device that cannot read host "
            "memory, each slot holds its own copy"
        )
    out = []
    for i in range(settings.parallel):
        llm = Llama(model_path=path, **kwargs)
        try:
            _prepare(llm, settings)
        except Exception:
            llm.close()
            for other, _ in out:
                other.close()
            raise
        out.append((llm, n_ctx))
        log.info("slot %d: %s, n_ctx %d, chat format %s", i, os.path.basename(path), n_ctx, llm.chat_format)
    return out, notes


def _load_sequences(path: str, kwargs: dict[str, Any], settings: Settings) -> list[tuple[Any, int]]:
    """One Llama of --parallel sequences (continuous batching); the slots are its slot(i)."""
    from ..llama import Llama

    n = settings.parallel
    llm = Llama(model_path=path, n_seq_max=n, kv_unified=settings.kv_unified, **kwargs)
    try:
        _prepare(llm, settings)  # (the chat format first: the slots copy it)
        slots = [llm.slot(i) for i in range(n)]
        for s in slots[1:]:
            if settings.prompt_cache is not None:
                s.set_cache(prompt_cache(*settings.prompt_cache))
    except Exception:
        llm.close()
        raise
    log.info(
        "%d slots: the sequences of one context (continuous batching), %s, n_ctx %d%s, chat format %s",
        n,
        os.path.basename(path),
        kwargs["n_ctx"],
        " shared (--kv-unified)" if settings.kv_unified else " each",
        llm.chat_format,
    )
    return [(s, kwargs["n_ctx"]) for s in slots]


def _prepare(llm: Any, settings: Settings) -> None:
    """A slot's chat format (checked now) and prompt cache."""
    apply_chat_template(llm, settings)
    _check_chat_format(llm)
    if settings.prompt_cache is not None:
        llm.set_cache(prompt_cache(*settings.prompt_cache))


def _check_chat_format(llm: Any) -> None:
    """A chat format that names no handler fails when the model loads (a ValueError), not at the first chat."""
    try:
        resolve_handler(llm)
    except LlamaChatCompletionHandlerNotFoundException as e:
        raise ValueError(f"chat format {llm.chat_format!r}: {e}") from None


def prompt_cache(kind: str, capacity_bytes: int) -> Any:
    """llama-cpp-python's prompt cache ("ram" or "disk", as its server's --cache_type) for a slot's Llama."""
    from ..cache import LlamaDiskCache, LlamaRAMCache

    return LlamaDiskCache(capacity_bytes=capacity_bytes) if kind == "disk" else LlamaRAMCache(capacity_bytes)


def apply_chat_template(llm: Any, settings: Settings) -> None:
    """--chat-template-file, or --chat-template (a template of the model, a named chat format, llama-server's names
    for DeepSeek, or an inline Jinja template), made `llm`'s chat format; ValueError for what is none of them."""
    if settings.chat_template_file:
        template_from_file(llm, settings.chat_template_file)
        return
    name = settings.chat_template
    if not name:
        return
    aliases = {"deepseek", "deepseek3", "deepseek4", "deepseek-v4", "deepseek_v4"}
    if name in llm.chat_formats:  # the model's templates and the named formats
        llm.chat_format = name
    elif name in aliases:
        llm.chat_format = "deepseek-v4"
    elif "{{" in name or "{%" in name:
        inline = TemplateChatHandler(name, "chat_template.cli")
        llm.chat_formats.register_chat_completion_handler("chat_template.cli", inline, overwrite=True)
        llm.chat_format = "chat_template.cli"
    else:
        raise ValueError(
            f"--chat-template {name!r}: not a template of this model nor a named chat format "
            f"({', '.join(llm.chat_formats.names())}) "
            "nor a Jinja template"
        )
