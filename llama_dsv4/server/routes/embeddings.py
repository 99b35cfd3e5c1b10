"""POST /v1/embeddings, /embeddings: refused with 501 (DeepSeek V4 has no embedding output), after the body is
read and checked like any other."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import schemas
from ..body import read_body
from ..errors import APIError
from ..state import State

router = APIRouter()


@router.post("/v1/embeddings")
@router.post("/embeddings")
async def embeddings(request: Request, state: State) -> Response:
    await read_body(request, schemas.EmbeddingRequest, state.settings)
    raise APIError(
        501,
        "embeddings are not available: DeepSeek V4 is a generative model without an embedding output",
        "not_implemented_error",
        param="model",
        code="embeddings_not_supported",
    )
