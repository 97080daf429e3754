"""POST /v1/embeddings."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from genserve.api.auth import principal
from genserve.api.errors import bad_request
from genserve.api.models import runtime_of
from genserve.api.schemas import WireModel
from genserve.api.stream import account
from genserve.runtime.models import EmbeddingModel
from genserve.runtime.runtime import Runtime
from genserve.storage.usage import Used

router = APIRouter()
MAX_INPUTS = 2048


class EmbeddingRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: (
        str
        | list[str]
        | list[Annotated[int, Field(ge=0)]]
        | list[list[Annotated[int, Field(ge=0)]]]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


def token_lists(model: EmbeddingModel, data) -> list[list[int]]:  # noqa: ANN001 - wire union
    if isinstance(data, str):
        data = [data]
    if not data:
        raise bad_request("input must not be empty", "input")
    if len(data) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", "input")
    if isinstance(data[0], int):
        data = [data]
    if isinstance(data[0], str):
        if any(not s for s in data):
            raise bad_request("input strings must not be empty", "input")
        return model.tokenize(data)
    for ids in data:
        if not ids or len(ids) > model.max_len:
            raise bad_request(f"each token array needs 1..{model.max_len} tokens", "input")
        if max(ids) >= model.vocab_size:
            raise bad_request(f"token ids must be in [0, {model.vocab_size})", "input")
    return [list(ids) for ids in data]


def encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    answer = await embeddings(runtime_of(request), principal(request).project, body)
    account(request, Used("embeddings", answer["model"], answer["usage"]["prompt_tokens"]))
    return answer


async def embeddings(rt: Runtime, project: str, body: EmbeddingRequest) -> dict:
    """OpenAI's embeddings list for a body (the Batch API's requests come here too)."""
    model = rt.embedder(body.model, project)
    if body.dimensions is not None and body.dimensions != model.dimensions:
        raise bad_request(
            f"{model.id} makes {model.dimensions}-dimensional embeddings and cannot shorten "
            "them (it was not trained for it)",
            "dimensions",
        )
    inputs = token_lists(model, body.input)
    vectors = await model.batcher.submit(inputs)
    tokens = sum(len(i) for i in inputs)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
