"""A request's JSON body, read within --max-body-mib and --timeout and checked against its schema (4xx else)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from . import heap
from .errors import APIError, from_validation
from .settings import Settings

M = TypeVar("M", bound=BaseModel)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, model: type[M], settings: Settings) -> tuple[M, dict[str, Any]]:
    """The body as `model` and as the JSON object it came as; a large one marks the request for heap.give_back."""
    max_body = int(settings.max_body_mib * 2**20)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise APIError(
            413,
            f"request body of {length} bytes is over the limit of {max_body} (--max-body-mib)",
            code="request_too_large",
        )
    data = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) >= heap.BIG_BODY:
                request.state.big_body = True
            if len(data) > max_body:
                raise APIError(
                    413,
                    f"request body is over the limit of {max_body} bytes (--max-body-mib)",
                    code="request_too_large",
                )

    try:
        await asyncio.wait_for(receive(), settings.timeout or None)
    except ClientDisconnect:
        raise APIError(400, "the client went away while sending the request", code="client_disconnected") from None
    except asyncio.TimeoutError:
        raise APIError(
            408, f"the request body took over {settings.timeout:g} s to arrive (--timeout)", code="request_timeout"
        ) from None
    try:
        raw = json.loads(data, parse_constant=_json_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(raw), raw
    except ValidationError as e:
        raise from_validation(e) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
