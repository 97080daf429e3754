"""Models as REST resources: register (load), reconfigure, unload; persisted across restarts.

Loading runs in a thread while the running engines keep serving. A model is admitted only if
its estimated memory fits the budget beside the models already loaded (507 otherwise). Base
models are shared by every project, so only admin keys register, change or unload them (403
otherwise); a fine-tuned model belongs to its project, whose members may delete it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.api.auth import principal, require_admin
from genserve.api.errors import APIError, bad_request, model_not_found
from genserve.api.limits import check_chat_template
from genserve.api.models import ModelSettings, ServedModel, Services, services
from genserve.api.schemas import ModelSettingsBody, RegisterModelRequest
from genserve.config import ServerConfig

log = logging.getLogger(__name__)
GIB = 2**30


class ModelRegistry:
    def __init__(self, svc: Services, config: ServerConfig, store: Any) -> None:
        self.svc = svc
        self.config = config
        self.store = store  # genserve.storage.models.ModelStore, or None without storage
        self.models_dir = Path(config.storage.models_dir).resolve()
        self.budget = budget_bytes(config.model.memory_budget_gb)
        self.used: dict[str, int] = {}  # model id -> estimated bytes
        self._tasks: set[asyncio.Task] = set()

    # -- references ---------------------------------------------------------------------------
    def check_ref(self, ref: str) -> str:
        """A bundled name, or the folder the ref names inside the models directory or the
        hub's cache (genserve.model.loading.resolve_api_ref); never the working directory."""
        from genserve.bundled import bundled_names
        from genserve.model.loading import ModelLoadError, OutsideModelsDirError, resolve_api_ref

        if ref in bundled_names():
            return ref
        try:
            return str(resolve_api_ref(ref, self.models_dir))
        except OutsideModelsDirError as e:
            raise APIError(403, str(e), "model", "forbidden_path") from None
        except ModelLoadError as e:
            raise bad_request(str(e), "model") from None

    # -- register -----------------------------------------------------------------------------
    def register(
        self,
        model_id: str,
        ref: str,
        kind: str | None,
        settings: ModelSettings,
        from_cli: bool = False,
    ) -> dict:
        if model_id in self.svc.models or model_id in self.svc.embedders:
            raise APIError(409, f"a model `{model_id}` is already loaded", "id", "model_exists")
        if self.svc.pending.get(model_id, {}).get("status") == "loading":
            raise APIError(409, f"`{model_id}` is already loading", "id", "model_exists")
        check_new_names(self.svc, model_id, settings.aliases)
        path = self.check_ref(ref)
        kind = kind or guess_kind(path)
        need = estimate_bytes(path, kind, self.config)
        self.check_budget(model_id, need)
        card = {
            "id": model_id, "object": "model", "created": int(time.time()),
            "owned_by": "genserve", "status": "loading", "kind": kind, "ref": ref, "error": None,
        }  # fmt: skip
        self.svc.pending[model_id] = card
        self.used[model_id] = need
        task = asyncio.create_task(self._load(model_id, path, ref, kind, settings, from_cli))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return card

    def check_budget(self, model_id: str, need: int) -> None:
        used = sum(v for k, v in self.used.items() if k != model_id)
        if used + need > self.budget:
            raise APIError(
                507,
                f"`{model_id}` needs about {need / GIB:.2f} GiB; {used / GIB:.2f} of the "
                f"{self.budget / GIB:.2f} GiB budget is in use. Unload a model first.",
                "model",
                "insufficient_memory",
            )

    async def _load(
        self, model_id: str, path: str, ref: str, kind: str, s: ModelSettings, from_cli: bool
    ) -> None:
        try:
            await asyncio.to_thread(self._build_and_start, model_id, path, kind, s)
        except Exception as e:  # noqa: BLE001 - the status says why
            log.warning("loading %s failed: %s", model_id, e)
            self.svc.pending[model_id] = {**self.svc.pending[model_id], "status": "failed",
                                          "error": f"{type(e).__name__}: {e}"}  # fmt: skip
            self.used.pop(model_id, None)
            return
        self.svc.pending.pop(model_id, None)
        if self.store is not None:
            self.store.put(model_id, ref, kind, s.as_dict(), from_cli=from_cli)
        log.info("loaded %s (%s) from %s", model_id, kind, ref)

    def _build_and_start(self, model_id: str, path: str, kind: str, s: ModelSettings) -> None:
        if kind == "embed":
            from genserve.api.embeddings import build_embedding_model

            self.svc.embedders[model_id] = build_embedding_model(
                path, model_id, self.config.model.device
            )
            return
        from genserve.server import build_served_model

        mc = replace(self.config.model, ref=path, served_name=model_id, lora_modules=())
        served = build_served_model(replace(self.config, model=mc))
        served.settings = s
        served.ref = path
        start_engine(self.svc, served)

    # -- settings -----------------------------------------------------------------------------
    def update(self, model_id: str, settings: ModelSettings) -> dict:
        served = self.svc.models.get(model_id)
        if served is None:
            raise model_not_found(model_id)
        check_settings(self.svc, served, settings)
        served.settings = settings
        if self.store is not None:
            self.store.put(model_id, served.ref or model_id, "generate", settings.as_dict(),
                           from_cli=self.is_cli(model_id))  # fmt: skip
        return served.card()

    def is_cli(self, model_id: str) -> bool:
        record = self.store.get(model_id) if self.store is not None else None
        return record.from_cli if record is not None else False

    # -- unload -------------------------------------------------------------------------------
    async def unload(self, model_id: str) -> None:
        if model_id in self.svc.pending:
            if self.svc.pending[model_id]["status"] == "loading":
                raise APIError(409, f"`{model_id}` is still loading", "model", "model_loading")
            self.svc.pending.pop(model_id)
        elif model_id in self.svc.embedders:
            await asyncio.to_thread(self.svc.embedders.pop(model_id).batcher.stop)
        elif model_id in self.svc.models:
            await self._unload_generator(model_id)
        else:
            raise model_not_found(model_id)
        self.used.pop(model_id, None)
        if self.store is not None:
            self.store.delete(model_id)

    async def _unload_generator(self, model_id: str) -> None:
        for adapter in [a for a in self.svc.adapters.values() if a.base == model_id]:
            await self.svc.unregister_adapter(adapter.id)
        served = self.svc.models.pop(model_id)
        await asyncio.to_thread(served.engine.stop)

    # -- start ----------------------------------------------------------------------------------
    async def restore(self) -> None:
        """Load what the registry held before the restart (the CLI's models load themselves)."""
        if self.store is None:
            return
        for record in self.store.all():
            if record.from_cli or record.id in self.svc.models or record.id in self.svc.embedders:
                continue
            settings = ModelSettings(**record.settings)
            try:
                self.register(record.id, record.ref, record.kind, settings)
            except APIError as e:
                log.error("cannot restore %s: %s", record.id, e.message)

    def adopt(self, model_id: str, ref: str, kind: str, size: int) -> ModelSettings:
        """A model the command line loaded: count its memory, restore its saved settings."""
        self.used[model_id] = size
        record = self.store.get(model_id) if self.store is not None else None
        settings = ModelSettings(**record.settings) if record is not None else ModelSettings()
        if self.store is not None:
            self.store.put(model_id, ref, kind, settings.as_dict(), from_cli=True)
        return settings


def start_engine(svc: Services, served: ServedModel) -> None:
    """Start a model's engine on the event loop's thread-safe path and make it visible."""
    loop = svc.state["loop"]
    done = asyncio.run_coroutine_threadsafe(start_served(svc, served), loop)
    done.result(timeout=60)


async def start_served(svc: Services, served: ServedModel) -> None:
    served.engine.start()
    metrics = svc.state.get("metrics")
    if metrics is not None:
        served.engine.observer = metrics.observer(served.id)
    svc.models[served.id] = served


def check_settings(svc: Services, served: ServedModel, s: ModelSettings) -> None:
    if s.max_context is not None and not 16 <= s.max_context <= served.max_len:
        raise bad_request(f"max_context must be in [16, {served.max_len}]", "max_context")
    for alias in s.aliases:
        taken = alias in svc.models or alias in svc.adapters or alias in svc.embedders
        other = any(alias in m.settings.aliases for m in svc.models.values() if m is not served)
        if taken or other:
            raise APIError(409, f"alias {alias!r} is already a model id or alias", "aliases")
    if s.chat_template is not None:
        check_chat_template(served.tokenizer, s.chat_template)


def check_new_names(svc: Services, model_id: str, aliases: list[str]) -> None:
    """A model being registered may not take a name in use: its id must not be another
    model's alias, nor an alias any model id, adapter or alias (409, as PATCH answers)."""
    if any(model_id in m.settings.aliases for m in svc.models.values()):
        raise APIError(409, f"`{model_id}` is already an alias of a model", "id", "model_exists")
    for alias in aliases:
        taken = alias == model_id or alias in svc.models or alias in svc.adapters
        taken = taken or alias in svc.embedders or alias in svc.pending
        if taken or any(alias in m.settings.aliases for m in svc.models.values()):
            raise APIError(409, f"alias {alias!r} is already a model id or alias", "aliases")


def guess_kind(path: str) -> str:
    """Embeddings for encoders, generation for causal LMs; read from config.json only."""
    import json

    from genserve.model.loading import resolve_model_ref

    folder = resolve_model_ref(path) if not Path(path).is_dir() else Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or "LMHead" in a for a in archs)
    return "generate" if causal else "embed"


def estimate_bytes(path: str, kind: str, config: ServerConfig) -> int:
    """Weights at fp32 (x2 on the fast path, which keeps packed copies) plus the KV cache."""
    from genserve.model.loading import resolve_model_ref
    from genserve.model.sizing import kv_cache_bytes, weight_bytes

    folder = resolve_model_ref(path) if not Path(path).is_dir() else Path(path)
    weights = weight_bytes(folder)
    if kind == "embed":
        return weights
    return 2 * weights + kv_cache_bytes(folder, config.engine)


def budget_bytes(gib: float | None) -> int:
    if gib is not None:
        return int(gib * GIB)
    import psutil

    return int(psutil.virtual_memory().total * 0.8)


def registry_of(svc: Services) -> ModelRegistry:
    registry = svc.state.get("registry")
    if registry is None:
        svc.require_ready()
        raise APIError(503, "the model registry is not available")
    return registry


def to_settings(body: ModelSettingsBody | None, base: ModelSettings | None = None) -> ModelSettings:
    """A PUT body (base None: unset means default) or a PATCH body (unset keeps `base`)."""
    current = (base or ModelSettings()).as_dict()
    given = body.model_dump(exclude_unset=True) if body is not None else {}
    if "defaults" in given:
        given["defaults"] = {k: v for k, v in (given["defaults"] or {}).items() if v is not None}
    if "aliases" in given and given["aliases"] is None:
        given["aliases"] = []
    return ModelSettings(**{**current, **given})


router = APIRouter()


@router.post("/v1/models", status_code=202)
async def register_model(body: RegisterModelRequest, request: Request) -> JSONResponse:
    """Load a model from a ref (a folder in the models directory, a bundled name, or a hub
    id); 202 with status `loading`, then poll GET /v1/models/{id} for `ready` or `failed`."""
    require_admin(request, "register models")
    svc = services(request)
    model_id = body.id or Path(body.model).name
    card = registry_of(svc).register(model_id, body.model, body.kind, to_settings(body.settings))
    return JSONResponse(card, status_code=202)


@router.put("/v1/models/{model_id:path}")
async def replace_settings(model_id: str, body: ModelSettingsBody, request: Request) -> dict:
    """Replace a model's serving defaults, chat template, aliases and maximum context."""
    require_admin(request, "change a model's settings")
    return registry_of(services(request)).update(model_id, to_settings(body))


@router.patch("/v1/models/{model_id:path}")
async def patch_settings(model_id: str, body: ModelSettingsBody, request: Request) -> dict:
    """Change some of them; what the body leaves out stays."""
    require_admin(request, "change a model's settings")
    svc = services(request)
    served = svc.models.get(model_id)
    if served is None:
        raise model_not_found(model_id)
    return registry_of(svc).update(model_id, to_settings(body, served.settings))


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, request: Request) -> dict:
    """Unload a model (admin keys), or delete a fine-tuned one (its adapter): its project's
    keys may; another project's is not found, as OpenAI answers for a model one does not own."""
    svc = services(request)
    spec = svc.adapter(model_id, principal(request))
    loaded = model_id in svc.models or model_id in svc.pending or model_id in svc.embedders
    if spec is None and (model_id in svc.adapters or model_id.startswith("ft:") and not loaded):
        raise model_not_found(model_id)  # another project's, or none: the same answer
    if spec is None or spec.project is None:  # base models and the operator's own adapters
        require_admin(request, "unload models")
    if spec is None:
        await registry_of(svc).unload(model_id)
    else:
        await svc.unregister_adapter(model_id)
        for hook in svc.on_adapter_deleted:
            await hook(model_id)
    return {"id": model_id, "object": "model", "deleted": True}
