"""Served models: the registry the routes read, and GET /v1/models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from genserve.api.errors import APIError, model_not_found
from genserve.api.logprobs import TokenText
from genserve.engine.client import AsyncEngine


@dataclass(slots=True)
class ServedModel:
    id: str
    created: int
    engine: AsyncEngine
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template
    chat_template: str
    max_len: int
    fingerprint: str  # build + weights + dtype + device: same fingerprint, same seeded output
    vocab_size: int  # width of the model's logits (may exceed the tokenizer's length)
    token_text: TokenText
    owned_by: str = "genserve"

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


@dataclass(slots=True)
class Services:
    """What the routes need, filled in by the lifespan once the model has loaded."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    ready: bool = False
    load_error: str | None = None

    def get(self, model_id: str) -> ServedModel:
        self.require_ready()
        served = self.models.get(model_id)
        if served is None:
            raise model_not_found(model_id)
        return served

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}")
        if not self.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})


def services(request: Request) -> Services:
    return request.app.state.services


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    svc = services(request)
    return {"object": "list", "data": [m.card() for m in svc.models.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    svc = services(request)
    served = svc.models.get(model_id)
    if served is None:
        raise model_not_found(model_id)
    return served.card()
