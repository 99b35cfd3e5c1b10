"""The models a server answers for, by name, as llama-cpp-python's server serves the models of its config file: the
request's `model` names one (an unknown or missing name means the first), and one model is loaded at a time.

A request for the loaded model runs at once (on its slots, in their queue). A request for another model waits
until every request admitted to the loaded one has finished, then the loaded model is closed and the asked one
loaded (seconds to minutes, as the model's size); requests that arrive meanwhile wait behind the switch in
arrival order, whichever model they ask for. A model that fails to load answers that request with an error, and
the next request loads again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .settings import Settings

if TYPE_CHECKING:
    from .slots import Job, SlotPool

log = logging.getLogger("llama_dsv4.server")


class ModelLoadError(RuntimeError):
    """The asked model could not be loaded (the message says which and why)."""


@dataclass
class Model:
    name: str
    settings: Settings


class ModelSet:
    """Named models, one loaded at a time. `enter(name)` admits a request to that model (loading it if needed) and
    returns its slots; `leave()` is called once per admitted request when its work is over."""

    def __init__(
        self,
        models: list[Model],
        pool: SlotPool | None = None,
        load: Callable[[Settings], tuple[list[tuple[Any, int]], list[str]]] | None = None,
    ) -> None:
        if not models:
            raise ValueError("no models")
        self.models = {m.name: m for m in models}
        if len(self.models) != len(models):
            raise ValueError("two models share a name")
        self.default = models[0].name
        self.pool = pool
        self.active: str | None = self.default if pool is not None else None
        self.users = 0
        self.switches = 0
        self.on_job_end: Callable[[Job], None] | None = None
        self._load = load
        self._lock = asyncio.Lock()  # FIFO: a pending switch holds back the requests that came after it
        self._idle: asyncio.Event | None = None  # made on the loop, when first needed

    @classmethod
    def single(cls, settings: Settings, pool: SlotPool) -> ModelSet:
        return cls([Model(settings.model_name, settings)], pool)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def pick(self, requested: str | None) -> Model:
        """The model a request's `model` field names; the first model for None or a name not served (OpenAI
        clients send names such as gpt-4o-mini; llama-cpp-python's server answers them with its first model)."""
        return self.models.get(requested or "", self.models[self.default])

    async def enter(self, model: Model) -> SlotPool:
        """Admit a request to `model`: its slots once it is loaded (ModelLoadError if it cannot be)."""
        async with self._lock:
            if model.name != self.active or self.pool is None:
                await self._wait_idle()
                await asyncio.to_thread(self._switch, model)
            assert self.pool is not None
            self.users += 1
            return self.pool

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self._idle is not None:
            self._idle.set()

    async def _wait_idle(self) -> None:
        while self.users > 0:
            self._idle = self._idle or asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    def _switch(self, model: Model) -> None:
        """(On a worker thread, with no request admitted.) Close the loaded model and load `model`."""
        old, previous, self.pool, self.active = self.pool, self.active, None, None
        if old is not None:
            log.info("model %r asked for: closing %r", model.name, previous)
            old.close()
        from .slots import SlotPool, load_slots

        try:
            llamas, notes = (self._load or load_slots)(model.settings)
        except Exception as e:
            log.error("model %r could not be loaded: %s", model.name, e)
            raise ModelLoadError(f"model {model.name!r} could not be loaded: {e}") from None
        for note in notes:
            log.info("note: %s", note)
        pool = SlotPool(llamas, self.on_job_end, model.settings.slot_prompt_similarity)
        self.pool, self.active = pool, model.name
        self.switches += 1
        log.info("model %r loaded: %d slot(s) of %d tokens", model.name, len(llamas), llamas[0][1])

    def close(self) -> bool:
        """At shutdown: close the loaded model's slots (see SlotPool.close)."""
        return self.pool.close() if self.pool is not None else True
