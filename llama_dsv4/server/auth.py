"""API keys: every route but /health wants one of --api-key's keys (as a bearer token or in X-API-Key)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


class ApiKeys:
    """The FastAPI dependency that checks a request's API key (none configured: every request passes)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    async def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(given.encode(), k) for k in self.keys):
            raise APIError(
                401,
                "Invalid API key (send it as 'Authorization: Bearer KEY')",
                "authentication_error",
                code="invalid_api_key",
            )
