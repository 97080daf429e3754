"""The model registry: register (load), reconfigure, unload; persisted across restarts.

Loading runs in a thread while the running engines keep serving. A model is admitted only if
its estimated memory fits the budget beside the models already loaded (InsufficientMemory
otherwise). Who may do which is the routes' business (genserve.api.registry).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genserve.config import ServerConfig
from genserve.runtime.errors import (
    Conflict,
    DomainError,
    InsufficientMemory,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
)
from genserve.runtime.limits import check_chat_template
from genserve.runtime.models import (
    AdapterSpec,
    EmbeddingModel,
    ModelSettings,
    PendingModel,
    ServedModel,
)

if TYPE_CHECKING:
    from genserve.runtime.runtime import Runtime

log = logging.getLogger(__name__)
GIB = 2**30
LORA = "lora"  # a record's kind for a LoRA adapter registered through the API


class ModelRegistry:
    def __init__(self, rt: Runtime, config: ServerConfig, store: Any) -> None:
        self.rt = rt
        self.config = config
        self.store = store  # genserve.storage.models.ModelStore, or None without storage
        self.models_dir = Path(config.storage.models_dir).resolve()
        self.budget = budget_bytes(config.model.memory_budget_gb, config.model.device)
        self.used: dict[str, int] = {}  # model id -> estimated bytes
        self._tasks: set[asyncio.Task] = set()
        self._adapters_loading: set[str] = set()
        rt.on_model_served.append(self.serve_saved_adapters)
        rt.on_adapter_deleted.append(self.forget_adapter)

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
            raise PermissionDenied(str(e), "model", "forbidden_path") from None
        except ModelLoadError as e:
            raise InvalidRequest(str(e), "model") from None

    # -- register -----------------------------------------------------------------------------
    def register(
        self,
        model_id: str,
        ref: str,
        kind: str | None,
        settings: ModelSettings,
        from_cli: bool = False,
    ) -> PendingModel:
        if model_id in self.rt.models or model_id in self.rt.embedders:
            raise Conflict(f"a model `{model_id}` is already loaded", "id", "model_exists")
        pending = self.rt.pending.get(model_id)
        if pending is not None and pending.status == "loading":
            raise Conflict(f"`{model_id}` is already loading", "id", "model_exists")
        check_new_names(self.rt, model_id, settings.aliases)
        path = self.check_ref(ref)
        kind = kind or guess_kind(path)
        need = estimate_bytes(path, kind, self.config)
        self.check_budget(model_id, need)
        aliases = tuple(settings.aliases)
        pending = PendingModel(model_id, int(time.time()), kind, ref, aliases=aliases)
        self.rt.pending[model_id] = pending
        self.used[model_id] = need
        task = asyncio.create_task(self._load(model_id, path, ref, kind, settings, from_cli))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pending

    # -- LoRA adapters ----------------------------------------------------------------------
    async def register_lora(self, model_id: str, ref: str, base: str | None) -> AdapterSpec:
        """Serve a peft LoRA folder of the models directory beside its base model, now and
        after a restart (its record names the base). Adapters load in milliseconds: the
        answer waits for it, and a folder that does not fit the base is a 400 here."""
        self.check_new_id(model_id)
        path = self.check_adapter_ref(ref)
        spec = AdapterSpec(model_id, pick_base(self.rt, path, base), path, int(time.time()))
        self._adapters_loading.add(model_id)
        try:
            await self.rt.register_adapter(spec)
        except DomainError:
            raise
        except Exception as e:  # noqa: BLE001 - what loading it said: the folder's fault
            msg = f"{ref!r} cannot be served on `{spec.base}`: {e}"
            raise InvalidRequest(msg, "model", "invalid_adapter") from None
        finally:
            self._adapters_loading.discard(model_id)
        if self.store is not None:
            self.store.put(model_id, ref, LORA, {"base": spec.base}, from_cli=False)
        log.info("serving adapter %s (%s) on %s", model_id, ref, spec.base)
        return spec

    def check_new_id(self, model_id: str) -> None:
        taken = ids_in_use(self.rt) | aliases_in_use(self.rt, except_of="") | self._adapters_loading
        if model_id in taken:
            raise Conflict(f"`{model_id}` is already a model id or alias", "id", "model_exists")

    def check_adapter_ref(self, ref: str) -> Path:
        from genserve.model.loading import (
            ModelLoadError,
            OutsideModelsDirError,
            resolve_api_adapter,
        )

        try:
            return resolve_api_adapter(ref, self.models_dir)
        except OutsideModelsDirError as e:
            raise PermissionDenied(str(e), "model", "forbidden_path") from None
        except ModelLoadError as e:
            raise InvalidRequest(str(e), "model") from None

    def is_adapter_ref(self, ref: str) -> bool:
        """Whether a ref names an adapter folder inside the models directory (whatever else
        it names is checked by the model's own path)."""
        from genserve.model.loading import is_adapter_folder

        try:
            target = (self.models_dir / ref).resolve()
        except (ValueError, OSError):  # a NUL byte, a link loop: the model's path says so
            return False
        return target.is_relative_to(self.models_dir) and is_adapter_folder(target)

    async def serve_saved_adapters(self, base: str | None = None) -> None:
        """The adapters registered through the API before a restart (or before their base was
        unloaded), once their base is served; `base`: only those on it."""
        if self.store is None:
            return
        for record in self.store.all():
            on = record.settings.get("base") if record.kind == LORA else None
            if on is None or on not in self.rt.models or record.id in self.rt.adapters:
                continue
            if base is not None and on != base:
                continue
            try:
                path = self.check_adapter_ref(record.ref)
                spec = AdapterSpec(record.id, on, path, record.created_at)
                await self.rt.register_adapter(spec)
            except Exception:  # noqa: BLE001 - one bad adapter must not stop the others
                log.exception("could not serve adapter %s again", record.id)

    async def forget_adapter(self, adapter_id: str) -> None:
        """DELETE of an adapter registered here: not served again after a restart."""
        record = self.store.get(adapter_id) if self.store is not None else None
        if record is not None and record.kind == LORA:
            self.store.delete(adapter_id)

    def check_budget(self, model_id: str, need: int) -> None:
        used = sum(v for k, v in self.used.items() if k != model_id)
        if used + need > self.budget:
            raise InsufficientMemory(
                f"`{model_id}` needs about {need / GIB:.2f} GiB; {used / GIB:.2f} of the "
                f"{self.budget / GIB:.2f} GiB budget is in use. Unload a model first.",
                "model",
                "insufficient_memory",
            )

    async def _load(
        self, model_id: str, path: str, ref: str, kind: str, s: ModelSettings, from_cli: bool
    ) -> None:
        try:
            built = await asyncio.to_thread(self._build, model_id, path, kind, s)
        except Exception as e:  # noqa: BLE001 - the status says why
            log.warning("loading %s failed: %s", model_id, e)
            failed = replace(self.rt.pending[model_id], status="failed")
            self.rt.pending[model_id] = replace(failed, error=f"{type(e).__name__}: {e}")
            self.used.pop(model_id, None)
            return
        # No await from here on: a request sees the model either loading or ready, never
        # both (a card saying ready while unload still found it loading answered 409).
        if isinstance(built, EmbeddingModel):
            self.rt.embedders[model_id] = built
        else:
            self.rt.start_served(built)
        self.rt.pending.pop(model_id, None)
        if self.store is not None:
            self.store.put(model_id, ref, kind, s.as_dict(), from_cli=from_cli)
        log.info("loaded %s (%s) from %s", model_id, kind, ref)
        if not isinstance(built, EmbeddingModel):
            await self.rt.announce_served(model_id)  # its fine-tuned models, served again

    def _build(
        self, model_id: str, path: str, kind: str, s: ModelSettings
    ) -> ServedModel | EmbeddingModel:
        if kind == "embed":
            from genserve.runtime.build import build_embedding_model

            return build_embedding_model(path, model_id, self.config.model.device)
        from genserve.runtime.build import build_served_model

        mc = replace(self.config.model, ref=path, served_name=model_id, lora_modules=())
        served = build_served_model(replace(self.config, model=mc))
        served.settings = s
        served.ref = path
        return served

    # -- settings -----------------------------------------------------------------------------
    def update(self, model_id: str, settings: ModelSettings) -> ServedModel:
        served = self.rt.models.get(model_id)
        if served is None:
            raise ModelNotFound(model_id)
        check_settings(self.rt, served, settings)
        served.settings = settings
        if self.store is not None:
            self.store.put(model_id, served.ref or model_id, "generate", settings.as_dict(),
                           from_cli=self.is_cli(model_id))  # fmt: skip
        return served

    def is_cli(self, model_id: str) -> bool:
        record = self.store.get(model_id) if self.store is not None else None
        return record.from_cli if record is not None else False

    # -- unload -------------------------------------------------------------------------------
    async def unload(self, model_id: str) -> None:
        if model_id in self.rt.pending:
            if self.rt.pending[model_id].status == "loading":
                raise Conflict(f"`{model_id}` is still loading", "model", "model_loading")
            self.rt.pending.pop(model_id)
            self._release_id(model_id)
        elif model_id in self.rt.embedders:
            embedder = self.rt.embedders.pop(model_id)
            await self._stopped(model_id, embedder.batcher.stop)
        elif model_id in self.rt.models:
            for adapter in [a for a in self.rt.adapters.values() if a.base == model_id]:
                await self.rt.unregister_adapter(adapter.id)
            await self._stopped(model_id, self.rt.take_served(model_id).stop)
        else:
            raise ModelNotFound(model_id)

    async def _stopped(self, model_id: str, stop: Callable[[], None]) -> None:
        """Stop a model already taken off the served ones. Its id is free from here: a load
        under it may begin while this one stops, and keeps its own budget entry and record
        (they were popped after the stop, and a reload's budget was lost: 13 models served
        where 12 filled it). Its memory counts until it is stopped."""
        stopping = f"{model_id}\0stopping"
        self.used[stopping] = self.used.pop(model_id, 0)
        self._release_id(model_id)
        try:
            await asyncio.to_thread(stop)
        finally:
            self.used.pop(stopping, None)

    def _release_id(self, model_id: str) -> None:
        self.used.pop(model_id, None)
        if self.store is not None:
            self.store.delete(model_id)

    # -- start ----------------------------------------------------------------------------------
    async def restore(self) -> None:
        """Load what the registry held before the restart (the CLI's models load themselves)."""
        if self.store is None:
            return
        for record in self.store.all():
            if record.from_cli or record.id in self.rt.models or record.id in self.rt.embedders:
                continue
            if record.kind == LORA:  # served once its base is (serve_saved_adapters)
                continue
            settings = ModelSettings(**record.settings)
            try:
                self.register(record.id, record.ref, record.kind, settings)
            except DomainError as e:
                log.error("cannot restore %s: %s", record.id, e.message)
        await self.serve_saved_adapters()  # those whose base the command line loaded

    def adopt(self, model_id: str, ref: str, kind: str, size: int) -> ModelSettings:
        """A model the command line loaded: count its memory, restore its saved settings."""
        self.used[model_id] = size
        record = self.store.get(model_id) if self.store is not None else None
        settings = ModelSettings(**record.settings) if record is not None else ModelSettings()
        if self.store is not None:
            self.store.put(model_id, ref, kind, settings.as_dict(), from_cli=True)
        return settings


def check_settings(rt: Runtime, served: ServedModel, s: ModelSettings) -> None:
    if s.max_context is not None and not 16 <= s.max_context <= served.max_len:
        raise InvalidRequest(f"max_context must be in [16, {served.max_len}]", "max_context")
    check_aliases(rt, served.id, s.aliases)
    if s.chat_template is not None:
        check_chat_template(served.tokenizer, s.chat_template)


def check_new_names(rt: Runtime, model_id: str, aliases: list[str]) -> None:
    """A model being registered may not take a name in use: its id must not be an adapter's
    or another model's alias, nor its aliases any name in use (409, as PATCH answers)."""
    if model_id in rt.adapters or model_id in aliases_in_use(rt, except_of=model_id):
        raise Conflict(f"`{model_id}` is already a model id or alias", "id", "model_exists")
    check_aliases(rt, model_id, aliases)


def check_aliases(rt: Runtime, model_id: str, aliases: list[str]) -> None:
    """`model_id`'s aliases: each named once, none another name in use, the names of models
    still loading included (two loads claiming one name both loaded, and the alias then
    resolved to whichever came first)."""
    if len(set(aliases)) != len(aliases):
        raise InvalidRequest("an alias is listed twice", "aliases")
    taken = ids_in_use(rt) | aliases_in_use(rt, except_of=model_id)
    for alias in aliases:
        if alias == model_id or alias in taken:
            raise Conflict(f"alias {alias!r} is already a model id or alias", "aliases")


def ids_in_use(rt: Runtime) -> set[str]:
    loading = {p.id for p in rt.pending.values() if p.status == "loading"}
    return {*rt.models, *rt.adapters, *rt.embedders, *loading}


def aliases_in_use(rt: Runtime, except_of: str) -> set[str]:
    """Every alias of a served or loading model but `except_of`."""
    served = (a for m in rt.models.values() if m.id != except_of for a in m.settings.aliases)
    loading = (
        a
        for p in rt.pending.values()
        if p.status == "loading" and p.id != except_of
        for a in p.aliases
    )
    return {*served, *loading}


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
    """The model's memory on the device it will load on, at its dtype (model.sizing)."""
    from genserve.model.loading import resolve_model_ref
    from genserve.model.sizing import model_bytes

    folder = resolve_model_ref(path) if not Path(path).is_dir() else Path(path)
    mc = config.model
    return model_bytes(folder, kind, mc.dtype, on_gpu(mc.device), config.engine)


# Device files of NVIDIA's driver, AMD's (ROCm) and WSL2's GPU bridge: without one, torch finds
# no CUDA device.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def on_gpu(device: str) -> bool:
    """Whether --device puts models on a GPU (auto: when CUDA is there, as loading does)."""
    if device == "cpu":
        return False
    if device == "auto" and not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        # torch.cuda would say no; importing torch to ask held the event loop for 3 s at every
        # start (open_registry runs on it), /health unanswered meanwhile.
        return False
    import torch

    return torch.cuda.is_available()


def budget_bytes(gib: float | None, device: str = "cpu") -> int:
    """--memory-budget-gb, else 80% of the memory models load into: the GPU's when they load
    on one (the budget then protects VRAM), else the machine's RAM."""
    if gib is not None:
        return int(gib * GIB)
    if on_gpu(device):
        import torch

        return int(torch.cuda.mem_get_info()[1] * 0.8)
    import psutil

    return int(psutil.virtual_memory().total * 0.8)


def pick_base(rt: Runtime, adapter: Path, base: str | None) -> str:
    """The served model an adapter goes on: the one named, else the one its
    adapter_config.json's base_model_name_or_path names (a served id, ref or folder name),
    else the only generative model served."""
    import json

    if base is not None:
        base = rt.resolve_alias(base)
        if base not in rt.models:
            raise InvalidRequest(f"no base model `{base}` is served", "base", "model_not_found")
        return base
    try:
        named = json.loads((adapter / "adapter_config.json").read_text())
        wanted = str(named.get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        wanted = ""
    names = Path(wanted).name
    for served in rt.models.values():
        if wanted and wanted in (served.id, served.ref) or names and names == served.path.name:
            return served.id
    if len(rt.models) == 1:
        return next(iter(rt.models))
    msg = "name the model this adapter goes on with `base`: "
    raise InvalidRequest(msg + f"its base_model_name_or_path {wanted!r} is none served", "base")
