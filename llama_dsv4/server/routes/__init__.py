"""The API's routes, a router per concern; each route takes the server's shared state as a parameter
(`state.State`).

`include` is the one list of them: the app takes its routes from here, and /metrics counts requests by their
paths."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from ..auth import ApiKeys
from . import completions, embeddings, health, models, status, tokenizing

# the routers behind the API key, in the order their routes are matched (/health needs none)
_KEYED = (models.router, status.router, completions.router, embeddings.router, tokenizing.router)


def include(app: FastAPI, api_keys: list[str]) -> list[str]:
    """Add every route to `app`, all but /health behind `api_keys` (if any); returns their paths."""
    app.include_router(health.router)
    check = [Depends(ApiKeys(api_keys))]
    for r in _KEYED:
        app.include_router(r, dependencies=check)
    return [route.path for r in (health.router, *_KEYED) for route in r.routes if isinstance(route, APIRoute)]
