"""OpenAI's model object for each thing the runtime serves (GET /v1/models and friends)."""

from __future__ import annotations

from genserve.runtime.models import (
    AdapterSpec,
    EmbeddingModel,
    Listed,
    PendingModel,
    ServedModel,
)


def served_card(m: ServedModel) -> dict:
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
        "status": "ready",
        "kind": "generate",
        "ref": m.ref,
        "max_context": m.context_limit,
        "max_model_len": m.context_limit,  # vLLM's name for it, which its clients read
        "root": m.ref,  # vLLM's: where the weights came from
        "settings": m.settings.as_dict(),
    }


def adapter_card(a: AdapterSpec) -> dict:
    return {
        "id": a.id,
        "object": "model",
        "created": a.created,
        "owned_by": a.owned_by,
        "parent": a.base,
    }


def embedding_card(e: EmbeddingModel) -> dict:
    return {
        "id": e.id, "object": "model", "created": e.created, "owned_by": e.owned_by,
        "status": "ready", "kind": "embed", "dimensions": e.dimensions,
    }  # fmt: skip


def pending_card(p: PendingModel) -> dict:
    return {
        "id": p.id, "object": "model", "created": p.created, "owned_by": "genserve",
        "status": p.status, "kind": p.kind, "ref": p.ref, "error": p.error,
    }  # fmt: skip


def card(item: Listed) -> dict:
    if isinstance(item, ServedModel):
        return served_card(item)
    if isinstance(item, AdapterSpec):
        return adapter_card(item)
    if isinstance(item, EmbeddingModel):
        return embedding_card(item)
    return pending_card(item)
