"""GET /v1/models, /models: the models served by name (the loaded one with its context and slots)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..state import State

router = APIRouter()


@router.get("/v1/models")
@router.get("/models")
async def list_models(state: State) -> dict[str, Any]:
    slots, _ = state.loaded()
    models = state.models
    data = []
    for name in models.names:
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": int(state.metrics.started),
            "owned_by": "llama-dsv4",
            "permissions": [],
        }
        if name == models.active and slots:
            entry["meta"] = {"n_ctx": slots[0].n_ctx, "slots": len(slots)}
        data.append(entry)
    return {"object": "list", "data": data}
