"""Runtime: one typed object with everything a request needs beyond HTTP.

The app's lifespan fills it (genserve.runtime.lifecycle); routes read it and call its methods,
which raise domain errors (genserve.runtime.errors) that the API maps to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from genserve.config import ServerConfig
from genserve.engine.client import Observer
from genserve.runtime.errors import (
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Unavailable,
)
from genserve.runtime.models import (
    AdapterSpec,
    EmbeddingModel,
    Listed,
    PendingModel,
    ServedModel,
    Target,
)

if TYPE_CHECKING:  # types only: these modules import the runtime's models themselves
    from genserve.runtime.batches import BatchHandler, BatchRunner
    from genserve.runtime.registry import ModelRegistry
    from genserve.storage.completions import CompletionRecords
    from genserve.storage.conversations import ConversationRecords
    from genserve.storage.db import Database
    from genserve.storage.files import FileStore
    from genserve.storage.responses import ResponseRecords
    from genserve.storage.uploads import UploadStore
    from genserve.storage.usage import UsageLedger
    from genserve.training.manager import JobManager, Launcher

log = logging.getLogger(__name__)
AdapterHook = Callable[[str], Awaitable[None]]
ModelHook = Callable[[str], Awaitable[None]]


class MetricsSink(Protocol):
    """Per-model metrics (genserve.api.metrics.Metrics): a served model's engine reports to
    its observer; the generation service reports each call it admits (its n, once per prompt);
    an unloaded model's series are forgotten."""

    def observer(self, model_id: str) -> Observer: ...

    def admitted(self, model_id: str, n: int, prompts: int) -> None: ...

    def forget(self, model_id: str) -> None: ...


@dataclass(slots=True)
class Runtime:
    config: ServerConfig
    models: dict[str, ServedModel] = field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    embedders: dict[str, EmbeddingModel] = field(default_factory=dict)
    pending: dict[str, PendingModel] = field(default_factory=dict)  # loading or failed
    ready: bool = False
    load_error: str | None = None
    on_adapter_deleted: list[AdapterHook] = field(default_factory=list)
    on_model_served: list[ModelHook] = field(default_factory=list)  # model id, once loaded
    # Costly per-request work (grammar compiles) at a lower CPU priority than the engine.
    metrics: MetricsSink | None = None  # set by the API
    database: Database | None = None
    registry: ModelRegistry | None = None
    files: FileStore | None = None
    uploads: UploadStore | None = None  # files sent in parts (set with files)
    usage: UsageLedger | None = None  # tokens per minute, project, key and model
    # Stored responses, chat completions and conversations kept elsewhere (a Ray engine
    # replica's: the control replica's store); None: this process's database.
    responses: ResponseRecords | None = None
    completions: CompletionRecords | None = None
    conversations: ConversationRecords | None = None
    fine_tuning: JobManager | None = None
    storage_error: str | None = None  # why files and jobs are unavailable
    training_launcher: Launcher | None = None  # None: a local subprocess (Ray sets its own)
    batch_handler: BatchHandler | None = None  # runs one batch line; set by the API
    batches: BatchRunner | None = None  # the Batch API's runner, once storage is up
    chores: list[asyncio.Task] = field(default_factory=list)  # periodic; cancelled at shutdown
    # Adapters registered lazily (checkpoints): listed and routable, loaded into their engine
    # on first use. None: not loaded yet; a task: loading.
    unloaded: dict[str, asyncio.Task | None] = field(default_factory=dict)

    # -- names -------------------------------------------------------------------------------
    def resolve_alias(self, model_id: str) -> str:
        for served in self.models.values():
            if model_id in served.settings.aliases:
                return served.id
        return model_id

    def adapter(self, model_id: str, project: str) -> AdapterSpec | None:
        """The adapter served as `model_id`, if `project` may see it (another project's
        fine-tuned model is, for it, a model that does not exist)."""
        spec = self.adapters.get(model_id)
        return spec if spec is not None and spec.visible_to(project) else None

    def get(self, model_id: str, project: str) -> Target:
        """The generative model (and adapter) a request names."""
        self.require_ready()
        model_id = self.resolve_alias(model_id)
        if model_id in self.embedders:
            msg = f"`{model_id}` is an embeddings model: use /v1/embeddings"
            raise InvalidRequest(msg, "model")
        self.require_loaded(model_id)
        if model_id in self.adapters:
            spec = self.adapter(model_id, project)
            if spec is None:
                raise ModelNotFound(model_id)
            return Target(self.models[spec.base], spec.id, project)
        served = self.models.get(model_id)
        if served is None:
            raise ModelNotFound(model_id)
        return Target(served, None, project)

    def embedder(self, model_id: str, project: str) -> EmbeddingModel:
        self.require_ready()
        self.require_loaded(model_id)
        model = self.embedders.get(model_id)
        if model is None:
            if model_id in self.models or self.adapter(model_id, project) is not None:
                raise InvalidRequest(f"`{model_id}` is not an embeddings model", "model")
            raise ModelNotFound(model_id)
        return model

    def listing(self, project: str) -> list[Listed]:
        """What `project` may use: every base model, shared adapters and its own."""
        return [
            *self.models.values(),
            *(a for a in self.adapters.values() if a.visible_to(project)),
            *self.embedders.values(),
            *self.pending.values(),
        ]

    def find(self, model_id: str, project: str) -> Listed:
        for item in self.listing(project):
            if item.id == model_id:
                return item
        # At start-up the model is listed once loaded: until then a 503 the client retries
        # (the generation routes say the same), not a 404 it does not.
        self.require_ready()
        raise ModelNotFound(model_id)

    # -- readiness ---------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.load_error:
            raise Unavailable(f"model failed to load: {self.load_error}")
        if not self.ready:
            raise NotReady("the model is still loading", retry_after_s=5)

    def require_loaded(self, model_id: str) -> None:
        pending = self.pending.get(model_id)
        if pending is not None and pending.status == "loading":
            raise NotReady(f"`{model_id}` is still loading", retry_after_s=2)
        if pending is not None:
            raise Unavailable(f"`{model_id}` failed to load: {pending.error}", "model")

    def model_registry(self) -> ModelRegistry:
        if self.registry is None:
            self.require_ready()
            raise Unavailable("the model registry is not available")
        return self.registry

    def file_store(self) -> FileStore:
        self.require_ready()
        if self.files is None:
            reason = self.storage_error or "storage is not configured"
            raise Unavailable(f"file storage is unavailable: {reason}")
        return self.files

    def upload_store(self) -> UploadStore:
        self.file_store()  # unavailable while loading or when storage failed, as files say
        assert self.uploads is not None  # set together with files
        return self.uploads

    def job_manager(self) -> JobManager:
        self.file_store()  # unavailable while loading or when storage failed, as files say
        assert self.fine_tuning is not None  # set together with files
        return self.fine_tuning

    # -- serving -----------------------------------------------------------------------------
    def start_served(self, served: ServedModel) -> None:
        """Start a model's engine and make it visible to requests (on the event loop)."""
        served.engine.start()
        if self.metrics is not None:
            served.engine.observer = self.metrics.observer(served.id)
        self.models[served.id] = served

    def take_served(self, model_id: str) -> ServedModel:
        """Take a model off the served ones, and its series off the metrics, at once (on the
        event loop): a model loaded under the same id while this one stops counts afresh,
        and its series are not the ones removed."""
        served = self.models.pop(model_id)
        if self.metrics is not None:
            self.metrics.forget(model_id)
        return served

    async def announce_served(self, model_id: str) -> None:
        """Tell whoever serves things on top of a model (fine-tuned adapters) it is loaded."""
        for hook in self.on_model_served:
            try:
                await hook(model_id)
            except Exception:  # noqa: BLE001 - the model itself is served; say what is not
                log.exception("serving what depends on %s failed", model_id)

    async def register_adapter(self, spec: AdapterSpec, lazy: bool = False) -> None:
        """Load a LoRA adapter into its base model's engine and serve it under spec.id
        (`lazy`: served now, loaded by the first request that uses it)."""
        base = self.models.get(spec.base)
        if base is None:
            raise ModelNotFound(spec.base)
        if lazy:
            self.unloaded[spec.id] = None
        else:
            await base.engine.add_adapter(spec.id, spec.path)
        self.adapters[spec.id] = spec

    async def ensure_loaded(self, target: Target) -> None:
        """A lazily registered adapter, loaded before its first request (one load however
        many requests wait for it; a failed one is tried again by the next request)."""
        if target.adapter is None or target.adapter not in self.unloaded:
            return
        spec = self.adapters[target.adapter]
        loading = self.unloaded[spec.id]
        if loading is None:
            loading = asyncio.ensure_future(target.served.engine.add_adapter(spec.id, spec.path))
            self.unloaded[spec.id] = loading
        try:
            await asyncio.shield(loading)
        except Exception as e:
            if self.unloaded.get(spec.id) is loading:
                self.unloaded[spec.id] = None
            raise Unavailable(f"`{spec.id}` could not be loaded: {e}", "model") from e
        if self.unloaded.get(spec.id) is loading:
            del self.unloaded[spec.id]

    async def unregister_adapter(self, adapter_id: str) -> AdapterSpec:
        spec = self.adapters.pop(adapter_id, None)
        if spec is None:
            raise ModelNotFound(adapter_id)
        loading = self.unloaded.pop(adapter_id, False)
        if loading is None:
            return spec  # never loaded: nothing in the engine
        if loading is not False:  # loading: let it end, then take it out
            try:
                await loading
            except Exception:  # noqa: BLE001 - its load failed: nothing to take out
                return spec
        await self.models[spec.base].engine.remove_adapter(adapter_id)
        return spec

    async def delete_adapter(self, adapter_id: str) -> None:
        """Unserve a fine-tuned model, its checkpoints with it, and tell whoever keeps its
        files (the job manager). A checkpoint alone is not deleted: it goes with its model."""
        spec = self.adapters.get(adapter_id)
        if spec is not None and spec.checkpoint_of is not None:
            msg = f"a checkpoint is deleted with its fine-tuned model: delete {spec.checkpoint_of}"
            raise InvalidRequest(msg, "model")
        await self.unregister_adapter(adapter_id)
        for ckpt in [a.id for a in self.adapters.values() if a.checkpoint_of == adapter_id]:
            await self.unregister_adapter(ckpt)
        for hook in self.on_adapter_deleted:
            await hook(adapter_id)
