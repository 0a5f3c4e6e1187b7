"""``POST /v1/embeddings``: vectors from the served model, through the same runtime.

An embedding request is a :meth:`GenerationRequest.embedding` submitted to the
executor like a completion: the ``X-Kensho-Priority`` and ``X-Kensho-Timeout``
headers, the queue limits, the drain and both circuit breakers apply, and a primary
that fails hands the inputs it has not embedded yet to the fallback. The engine
answers one chunk per input (its vector and token count).

``encoding_format: "base64"`` is OpenAI's: the little-endian float32 bytes of each
vector, base64-encoded (what the official client asks for by default, and decodes).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kensho.runtime.engines.base import GenerationChunk, GenerationRequest
from kensho.server._context import ServerContext
from kensho.server._errors import APIError
from kensho.server._fields import audit_embedding
from kensho.server._openai import CompletionRunner, check_model, served_features
from kensho.server._schemas import EmbeddingRequest

__all__ = ["add_embedding_route", "encode_embedding", "shape_embeddings"]


def encode_embedding(vector: tuple[float, ...], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI returns it: a list of floats, or base64 of float32 LE."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def shape_embeddings(
    chunks: list[GenerationChunk], model: str, encoding_format: str
) -> dict[str, Any]:
    """The ``/v1/embeddings`` answer: one ``embedding`` object per input, in order."""
    data = []
    prompt_tokens = 0
    for chunk in sorted(chunks, key=lambda c: c.index):
        if chunk.embedding is None:
            raise APIError(500, "the engine answered an embedding request without a vector")
        prompt_tokens += chunk.prompt_tokens or 0
        data.append(
            {
                "object": "embedding",
                "index": chunk.index,
                "embedding": encode_embedding(chunk.embedding, encoding_format),
            }
        )
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def add_embedding_route(app: FastAPI, ctx: ServerContext, runner: CompletionRunner) -> None:
    """Register ``POST /v1/embeddings`` on ``app``."""

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        check_model(ctx, body.model)
        audit_embedding(body, served_features(ctx))
        gen = GenerationRequest.embedding(body.inputs())
        chunks = await runner.run_whole("embeddings", body.model, gen, request)
        if chunks is None:
            return Response(status_code=499)  # the client went away
        return JSONResponse(shape_embeddings(chunks, body.model, body.encoding_format))
