"""Models as REST resources: register (load), reconfigure, unload (genserve.runtime.registry
does the work). Base models are shared by every project, so only admin keys register, change
or unload them (403 otherwise); a fine-tuned model belongs to its project, whose members may
delete it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ConfigDict, Field, StrictBool

from genserve.api.auth import principal, require_admin
from genserve.api.cards import adapter_card, pending_card, served_card
from genserve.api.errors import APIError, ErrorResponse, bad_request, model_not_found
from genserve.api.models import runtime_of
from genserve.api.schemas import ModelSettingsBody, RegisterModelRequest, WireModel
from genserve.runtime.models import ModelSettings
from genserve.runtime.registry import ModelRegistry


def to_settings(body: ModelSettingsBody | None, base: ModelSettings | None = None) -> ModelSettings:
    """A PUT body (base None: unset means default) or a PATCH body (unset keeps `base`)."""
    current = (base or ModelSettings()).as_dict()
    given = body.model_dump(exclude_unset=True) if body is not None else {}
    if "defaults" in given:
        given["defaults"] = merged_defaults(current["defaults"], given["defaults"])
    if "aliases" in given and given["aliases"] is None:
        given["aliases"] = []
    return ModelSettings(**{**current, **given})


def merged_defaults(current: dict, given: dict | None) -> dict:
    """Serving defaults patched key by key, as a JSON merge patch (RFC 7396) does: a PATCH
    naming max_tokens keeps the temperature it leaves out; null removes a default, and
    `"defaults": null` all of them. A PUT's `current` is empty: what it names is all there is."""
    if given is None:
        return {}
    return {k: v for k, v in {**current, **given}.items() if v is not None}


router = APIRouter()


# An id or alias that another model already answers to (or one still loading).
CONFLICT = {409: {"description": "The id or an alias is taken", "model": ErrorResponse}}


@router.post("/v1/models", status_code=202, responses=CONFLICT)
async def register_model(body: RegisterModelRequest, request: Request) -> JSONResponse:
    """Load a model from a ref (a folder in the models directory, a bundled name, or a hub
    id); 202 with status `loading`, then poll GET /v1/models/{id} for `ready` or `failed`."""
    require_admin(request, "register models")
    registry = runtime_of(request).model_registry()
    model_id = body.id or Path(body.model).name
    if body.kind == "lora" or body.kind is None and registry.is_adapter_ref(body.model):
        return JSONResponse(await register_lora(registry, model_id, body))
    if body.base is not None:
        raise bad_request("`base` names the model a LoRA adapter goes on", "base")
    pending = registry.register(model_id, body.model, body.kind, to_settings(body.settings))
    return JSONResponse(pending_card(pending), status_code=202)


async def register_lora(registry: ModelRegistry, model_id: str, body: RegisterModelRequest) -> dict:
    """A LoRA folder: served at once on its base (200, its card); its settings are its base's."""
    if body.settings is not None:
        msg = "an adapter takes its base model's settings: set them on the base"
        raise bad_request(msg, "settings")
    spec = await registry.register_lora(model_id, body.model, body.base)
    return {**adapter_card(spec), "status": "ready", "kind": "lora"}


@router.put("/v1/models/{model_id:path}", responses=CONFLICT)
async def replace_settings(model_id: str, body: ModelSettingsBody, request: Request) -> dict:
    """Replace a model's serving defaults, chat template, aliases and maximum context."""
    require_admin(request, "change a model's settings")
    rt = runtime_of(request)
    model_id = rt.resolve_alias(model_id)  # as GET resolves it
    return served_card(rt.model_registry().update(model_id, to_settings(body)))


@router.patch("/v1/models/{model_id:path}", responses=CONFLICT)
async def patch_settings(model_id: str, body: ModelSettingsBody, request: Request) -> dict:
    """Change some of them; what the body leaves out stays."""
    require_admin(request, "change a model's settings")
    rt = runtime_of(request)
    model_id = rt.resolve_alias(model_id)  # as GET resolves it
    served = rt.models.get(model_id)
    if served is None:
        raise model_not_found(model_id)
    return served_card(rt.model_registry().update(model_id, to_settings(body, served.settings)))


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request) -> dict:
    """Unload a model (admin keys), or delete a fine-tuned one (its adapter): its project's
    keys may; another project's is not found, as OpenAI answers for a model one does not own."""
    rt = runtime_of(request)
    if (target := rt.resolve_alias(model_id)) != model_id:
        raise alias_not_deletable(model_id, target)
    spec = rt.adapter(model_id, principal(request).project)
    loaded = model_id in rt.models or model_id in rt.pending or model_id in rt.embedders
    if spec is None and (model_id in rt.adapters or model_id.startswith("ft:") and not loaded):
        raise model_not_found(model_id)  # another project's, or none: the same answer
    if spec is None or spec.project is None:  # base models and the operator's own adapters
        require_admin(request, "unload models")
    if spec is None:
        await rt.model_registry().unload(model_id)
    else:
        await rt.delete_adapter(model_id)
    return {"id": model_id, "object": "model", "deleted": True}


def alias_not_deletable(alias: str, model_id: str) -> APIError:
    """DELETE names models by id only: unloading a model through one of its aliases would take
    every other name with it, which a caller who only knew the alias may not expect."""
    msg = (
        f"`{alias}` is an alias of `{model_id}`: unload the model by its id, or drop the alias "
        f"with PATCH /v1/models/{model_id} and its remaining `aliases`."
    )
    return APIError(400, msg, "model", "model_is_alias")


# -- vLLM's runtime LoRA routes ----------------------------------------------------------------
class LoadLoraBody(WireModel):
    """vLLM's POST /v1/load_lora_adapter; the path must lie inside the models directory."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\w.:/-]+$")]
    lora_path: Annotated[str, Field(min_length=1, max_length=512)]
    load_inplace: StrictBool = False  # replace an adapter already served under the name
    base_model_name: str | None = None  # genserve's: which served model (default: as POST)


class UnloadLoraBody(WireModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: Annotated[str, Field(min_length=1, max_length=128)]
    lora_int_id: int | None = None  # vLLM's; names are unique here


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraBody, request: Request) -> PlainTextResponse:
    """What vLLM answers (a line of text), for its users' scripts: POST /v1/models does the
    same with a model card."""
    require_admin(request, "load adapters")
    rt = runtime_of(request)
    registry = rt.model_registry()
    served = rt.adapters.get(body.lora_name)
    if served is not None and served.project is None and body.load_inplace:
        registry.check_adapter_ref(body.lora_path)  # a bad path leaves the served one alone
        await rt.delete_adapter(body.lora_name)
    await registry.register_lora(body.lora_name, body.lora_path, body.base_model_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraBody, request: Request) -> PlainTextResponse:
    require_admin(request, "unload adapters")
    rt = runtime_of(request)
    spec = rt.adapters.get(body.lora_name)
    if spec is None or spec.project is not None:  # a project's fine-tuned model: DELETE it
        raise model_not_found(body.lora_name)
    await rt.delete_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
