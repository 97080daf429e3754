"""Served models: the registry the routes read, and GET /v1/models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from genserve.api.auth import Principal, principal
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
    project: str | None = None  # a fine-tuned model's owner; None: shared (operator's adapters)

    def visible_to(self, who: Principal) -> bool:
        return self.project is None or self.project == who.project

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "parent": self.base,
        }


@dataclass(slots=True)
class ModelSettings:
    """Serving defaults an operator sets through PUT/PATCH /v1/models/{id}; persisted."""

    defaults: dict[str, Any] = field(default_factory=dict)  # sampling fields a request omits
    chat_template: str | None = None  # None: the tokenizer's own
    aliases: list[str] = field(default_factory=list)
    max_context: int | None = None  # None: the engine's whole context

    def as_dict(self) -> dict:
        return {
            "defaults": dict(self.defaults),
            "chat_template": self.chat_template,
            "aliases": list(self.aliases),
            "max_context": self.max_context,
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
    settings: ModelSettings = field(default_factory=ModelSettings)
    ref: str = ""  # what it was loaded from
    # UTF-8 bytes of the vocabulary's longest token (0: unknown). A text of B bytes has at
    # least B / max_token_bytes tokens, so a prompt too long for the context is refused
    # before the tokenizer spends seconds and hundreds of MB on it (genserve.api.limits).
    max_token_bytes: int = 0

    @property
    def context_limit(self) -> int:
        """Tokens a request may use: the engine's context, or less if the operator said so."""
        limit = self.settings.max_context
        return min(limit, self.max_len) if limit else self.max_len

    @property
    def template(self) -> str:
        return self.settings.chat_template or self.chat_template

    def card(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "status": "ready",
            "kind": "generate",
            "ref": self.ref,
            "max_context": self.context_limit,
            "settings": self.settings.as_dict(),
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
    embedders: dict[str, Any] = field(default_factory=dict)  # id -> api.embeddings.EmbeddingModel
    pending: dict[str, dict] = field(default_factory=dict)  # id -> card of a loading/failed model
    ready: bool = False
    load_error: str | None = None
    on_adapter_deleted: list[AdapterHook] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # other services (files, jobs, ...)

    def resolve_alias(self, model_id: str) -> str:
        for served in self.models.values():
            if model_id in served.settings.aliases:
                return served.id
        return model_id

    def adapter(self, model_id: str, who: Principal) -> AdapterSpec | None:
        """The adapter served as `model_id`, if `who` may see it (another project's fine-tuned
        model is, for `who`, a model that does not exist)."""
        spec = self.adapters.get(model_id)
        return spec if spec is not None and spec.visible_to(who) else None

    def get(self, model_id: str, who: Principal) -> Target:
        self.require_ready()
        model_id = self.resolve_alias(model_id)
        if model_id in self.embedders:
            raise APIError(400, f"`{model_id}` is an embeddings model: use /v1/embeddings", "model")
        self.require_loaded(model_id)
        if model_id in self.adapters:
            spec = self.adapter(model_id, who)
            if spec is None:
                raise model_not_found(model_id)
            return Target(self.models[spec.base], spec.id)
        served = self.models.get(model_id)
        if served is None:
            raise model_not_found(model_id)
        return Target(served, None)

    def require_loaded(self, model_id: str) -> None:
        card = self.pending.get(model_id)
        if card is not None and card["status"] == "loading":
            raise APIError(503, f"`{model_id}` is still loading", headers={"Retry-After": "2"})
        if card is not None:
            raise APIError(503, f"`{model_id}` failed to load: {card.get('error')}", "model")

    def embedder(self, model_id: str, who: Principal) -> Any:
        self.require_ready()
        self.require_loaded(model_id)
        model = self.embedders.get(model_id)
        if model is None:
            if model_id in self.models or self.adapter(model_id, who) is not None:
                raise APIError(400, f"`{model_id}` is not an embeddings model", "model")
            raise model_not_found(model_id)
        return model

    def card(self, model_id: str, who: Principal) -> dict:
        for card in self.cards(who):
            if card["id"] == model_id:
                return card
        raise model_not_found(model_id)

    def require_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}")
        if not self.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})

    def cards(self, who: Principal) -> list[dict]:
        """What `who` may use: every base model, shared adapters and its project's own."""
        return [
            *(m.card() for m in self.models.values()),
            *(a.card() for a in self.adapters.values() if a.visible_to(who)),
            *(e.card() for e in self.embedders.values()),
            *self.pending.values(),
        ]

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
    return {"object": "list", "data": services(request).cards(principal(request))}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    svc = services(request)
    return svc.card(svc.resolve_alias(model_id), principal(request))
