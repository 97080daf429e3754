"""vLLM's scoring routes over an embeddings model: POST /v1/score (pairs of texts -> a score
each) and POST /v1/rerank (a query and documents -> the documents by relevance; the Jina/Cohere
shape that RAG stacks call, also at /rerank and /v2/rerank). The score is the cosine similarity
of the two texts' embeddings, as vLLM scores with an embedding model: a bi-encoder's score,
coarser than a cross-encoder's, and computed from the same batched embeddings /v1/embeddings
serves.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, StrictBool

from genserve.api.auth import principal
from genserve.api.embeddings import MAX_INPUTS, token_lists
from genserve.api.errors import bad_request
from genserve.api.models import runtime_of
from genserve.api.schemas import WireModel
from genserve.runtime.models import EmbeddingModel

router = APIRouter()
Text = Annotated[str, Field(min_length=1)]


class ScoreRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    # One text against each of the others, or two lists zipped pair by pair.
    text_1: Text | Annotated[list[Text], Field(min_length=1)]
    text_2: Text | Annotated[list[Text], Field(min_length=1)]


class Document(WireModel):
    text: Text


class RerankRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    query: Text
    documents: Annotated[list[Text | Document], Field(min_length=1, max_length=MAX_INPUTS - 1)]
    top_n: Annotated[int, Field(ge=0)] | None = None  # 0 or none: every document
    return_documents: StrictBool = True


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / norm if norm else 0.0


async def embed(model: EmbeddingModel, texts: list[str]) -> tuple[list[list[float]], int]:
    """Each text's embedding, and the tokens read (what usage counts)."""
    inputs = token_lists(model, texts)
    return await model.batcher.submit(inputs), sum(len(i) for i in inputs)


def pairs(body: ScoreRequest) -> tuple[list[str], list[str]]:
    left = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    right = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(left) == 1:
        return left * len(right), right
    if len(left) != len(right):
        msg = f"text_1 has {len(left)} texts and text_2 {len(right)}: one, or as many as text_2"
        raise bad_request(msg, "text_1")
    return left, right


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request) -> dict:
    model = runtime_of(request).embedder(body.model, principal(request).project)
    left, right = pairs(body)
    if len(left) + len(right) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS // 2} pairs per request", "text_2")
    vectors, tokens = await embed(model, left + right)
    scores = [cosine(a, b) for a, b in zip(vectors[: len(left)], vectors[len(left) :], strict=True)]
    return {
        "id": f"score-{secrets.token_hex(12)}",
        "object": "list",
        "created": int(time.time()),
        "model": model.id,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, request: Request) -> dict:
    model = runtime_of(request).embedder(body.model, principal(request).project)
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    vectors, tokens = await embed(model, [body.query, *texts])
    ranked = sorted(
        ((i, cosine(vectors[0], v)) for i, v in enumerate(vectors[1:])),
        key=lambda pair: -pair[1],  # sorted is stable: equal scores keep the documents' order
    )
    if body.top_n:
        ranked = ranked[: body.top_n]
    return {
        "id": f"rerank-{secrets.token_hex(12)}",
        "model": model.id,
        "usage": {"total_tokens": tokens},
        "results": [result(i, s, texts[i], body.return_documents) for i, s in ranked],
    }


def result(index: int, score: float, text: str, with_document: bool) -> dict:
    out: dict = {"index": index, "relevance_score": score}
    if with_document:
        out["document"] = {"text": text}
    return out
