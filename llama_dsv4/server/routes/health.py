"""GET /health, /v1/health: the slots idle and busy (the one route without an API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..state import State

router = APIRouter()


@router.get("/health")
@router.get("/v1/health")
async def health(state: State) -> dict[str, Any]:
    slots, _ = state.loaded()
    busy = sum(1 for s in slots if s.job is not None)
    return {"status": "ok", "slots_idle": len(slots) - busy, "slots_processing": busy}
