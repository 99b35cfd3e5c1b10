"""What the routes share: the server's settings, the models served and their slots, the metrics and the threads
that tokenize. Built once by `create_app`, kept in `app.state.server`; a route takes it as a parameter of type
`State` (a FastAPI dependency)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from .errors import APIError
from .metrics import Metrics
from .models import Model, ModelLoadError, ModelSet
from .settings import Settings
from .slots import SlotPool

TOKENIZE_THREADS = 2  # /tokenize and /detokenize requests worked on at once (more wait)


@dataclass
class ServerState:
    """The server's shared state. `pool` is the first model's slots (their context bounds a request's `n`)."""

    settings: Settings
    pool: SlotPool
    models: ModelSet
    metrics: Metrics
    text_work: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
    )

    def loaded(self) -> tuple[list[Any], int]:
        """The loaded model's slots and queue depth (none while another model is being loaded)."""
        pool = self.models.pool
        return (pool.slots, pool.waiting) if pool is not None else ([], 0)

    async def enter(self, model: Model) -> SlotPool:
        """Admit a request to `model` (loaded first if another one is): its slots; `models.leave()` when done."""
        try:
            return await self.models.enter(model)
        except ModelLoadError as e:
            raise APIError(500, str(e), "server_error", param="model", code="model_load_failed") from None


def server_state(request: Request) -> ServerState:
    """The app's ServerState (set by create_app), for the routes as a FastAPI dependency (`State`)."""
    state: ServerState = request.app.state.server
    return state


State = Annotated[ServerState, Depends(server_state)]
