"""Served models: the registry the routes read, and GET /v1/models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from genserve.api.errors import APIError, model_not_found
from genserve.api.logprobs import TokenText
from genserve.engine.client import AsyncEngine


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter (peft format) served on top of a loaded base model."""

    id: str  # "ft:<base>:<suffix>:<job-id>"
    base: str  # id of the served base model
    path: Path  # folder with adapter_config.json and adapter_model.safetensors
    created: int
    owned_by: str = "genserve"

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "parent": self.base,
        }


@dataclass(slots=True)
class ServedModel:
    id: str
    created: int
    engine: AsyncEngine
    path: Path  # the base model's folder (fine-tuning reads the weights from it)
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template
    chat_template: str
    max_len: int
    fingerprint: str  # build + weights + dtype + device: same fingerprint, same seeded output
    vocab_size: int  # width of the model's logits (may exceed the tokenizer's length)
    token_text: TokenText
    grammars: Any  # genserve.model.grammar.GrammarCompiler: validate(spec) at the edge
    owned_by: str = "genserve"

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` names: a base model, maybe with one of its adapters."""

    served: ServedModel
    adapter: str | None  # adapter id, or None for the base model itself

    @property
    def id(self) -> str:
        return self.adapter or self.served.id


AdapterHook = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class Services:
    """What the routes need, filled in by the lifespan once the model has loaded."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    ready: bool = False
    load_error: str | None = None
    on_adapter_deleted: list[AdapterHook] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # other services (files, jobs, ...)

    def get(self, model_id: str) -> Target:
        self.require_ready()
        if model_id in self.adapters:
            spec = self.adapters[model_id]
            return Target(self.models[spec.base], spec.id)
        served = self.models.get(model_id)
        if served is None:
            raise model_not_found(model_id)
        return Target(served, None)

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}")
        if not self.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})

    def cards(self) -> list[dict]:
        return [m.card() for m in self.models.values()] + [a.card() for a in self.adapters.values()]

    async def register_adapter(self, spec: AdapterSpec) -> None:
        """Load a LoRA adapter into its base model's engine and serve it under spec.id."""
        base = self.models.get(spec.base)
        if base is None:
            raise model_not_found(spec.base)
        await base.engine.add_adapter(spec.id, spec.path)
        self.adapters[spec.id] = spec

    async def unregister_adapter(self, adapter_id: str) -> AdapterSpec:
        spec = self.adapters.pop(adapter_id, None)
        if spec is None:
            raise model_not_found(adapter_id)
        await self.models[spec.base].engine.remove_adapter(adapter_id)
        return spec


def services(request: Request) -> Services:
    return request.app.state.services


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": services(request).cards()}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    svc = services(request)
    for card in svc.cards():
        if card["id"] == model_id:
            return card
    raise model_not_found(model_id)


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request) -> dict:
    """Deletes a fine-tuned model (its adapter). Base models are not deletable here."""
    svc = services(request)
    if model_id in svc.models:
        raise APIError(
            403,
            "base models cannot be deleted; only fine-tuned ones",
            "model",
            "model_not_deletable",
        )
    await svc.unregister_adapter(model_id)
    for hook in svc.on_adapter_deleted:
        await hook(model_id)
    return {"id": model_id, "object": "model", "deleted": True}
