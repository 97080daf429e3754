"""GET /v1/models and /v1/models/{id}; and how a route reaches the runtime."""

from __future__ import annotations

from fastapi import APIRouter, Request

from genserve.api.auth import principal
from genserve.api.cards import card
from genserve.runtime.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    items = runtime_of(request).listing(principal(request).project)
    return {"object": "list", "data": [card(m) for m in items]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    rt = runtime_of(request)
    return card(rt.find(rt.resolve_alias(model_id), principal(request).project))
