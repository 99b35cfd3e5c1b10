"""GET /props (the loaded model, as llama-server's) and /metrics (Prometheus text, see metrics.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ..metrics import CONTENT_TYPE
from ..state import State

router = APIRouter()


@router.get("/props")
async def props(state: State) -> dict[str, Any]:
    slots, _ = state.loaded()
    llm = slots[0].llm if slots else None
    return {
        "model": state.models.active,
        "model_path": getattr(llm, "model_path", None),
        "n_ctx": slots[0].n_ctx if slots else None,
        "total_slots": len(slots),
        "chat_format": getattr(llm, "chat_format", None),
        "build_info": f"llama-dsv4 {__version__}",
    }


@router.get("/metrics")
async def get_metrics(state: State) -> PlainTextResponse:
    text = await run_in_threadpool(state.metrics.render, *state.loaded())
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
