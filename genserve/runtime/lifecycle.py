"""Start and stop: the command line's model, its adapters, storage and fine-tuning, then the
models registered through the API; and the reverse on shutdown. The app's lifespan calls these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genserve.bundled import bundled_adapters, bundled_names
from genserve.config import ServerConfig
from genserve.engine.process import EngineProcess
from genserve.runtime import heap
from genserve.runtime.batches import BatchRunner
from genserve.runtime.engine_main import spawn_engine
from genserve.runtime.errors import DomainError
from genserve.runtime.models import AdapterSpec, ModelSettings, ServedModel
from genserve.runtime.registry import ModelRegistry
from genserve.runtime.runtime import Runtime
from genserve.storage.batches import BatchStore
from genserve.storage.db import open_database
from genserve.storage.files import FileStore
from genserve.storage.jobs import JobStore
from genserve.storage.models import ModelStore
from genserve.storage.responses import ResponseStore
from genserve.storage.uploads import UploadStore
from genserve.storage.usage import FLUSH_S, UsageLedger
from genserve.training.manager import JobManager

log = logging.getLogger(__name__)

Loader = Callable[[ServerConfig], ServedModel]


def default_loader(config: ServerConfig) -> ServedModel:
    """genserve.runtime.build.build_served_model, imported when first needed: it brings torch."""
    from genserve.runtime.build import build_served_model

    return build_served_model(config)


def build_in_child(config: ServerConfig) -> Any:  # noqa: ANN401 - build.EngineParts
    """genserve.runtime.build.build_engine, imported in the engine process only."""
    from genserve.runtime.build import build_engine

    return build_engine(config)


class EarlyEngineLoader:
    """A Loader whose engine process starts now, before the app is built (genserve.server):
    the first call takes it; `discard` stops it if nothing did (the app never loaded)."""

    def __init__(self, config: ServerConfig) -> None:
        self.child: EngineProcess | None = spawn_engine(config, build_in_child)

    def __call__(self, config: ServerConfig) -> ServedModel:
        from genserve.runtime.build import build_served_model

        child, self.child = self.child, None
        return build_served_model(config, child)

    def discard(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


async def load(rt: Runtime, loader: Loader) -> None:
    """Load the command line's model and everything that depends on it; `rt.ready` at the end.
    A failure is kept in `rt.load_error` (reported on /health and every route)."""
    config = rt.config
    reg = open_registry(rt)
    fail_unfinished_responses(rt)  # before any route may start one
    try:
        served = await asyncio.to_thread(loader, config)
    except Exception as e:  # noqa: BLE001 - reported on /health and every route
        log.exception("model failed to load")
        rt.load_error = str(e)
        return
    served.ref = config.model.ref
    served.settings = reg.adopt(served.id, served.ref, "generate", model_size(served, config))
    rt.start_served(served)
    try:
        await serve_adapters(rt, served)
    except Exception as e:  # noqa: BLE001 - an adapter the operator asked for must not be skipped
        log.exception("adapter failed to load")
        rt.load_error = f"adapter failed to load: {e}"
        return
    await start_fine_tuning(rt)  # files, jobs; serves fine-tuned adapters again
    load_embeddings(reg, config)
    await reg.restore()  # models registered through the API before a restart
    rt.ready = True
    await start_batches(rt)  # resumes unfinished batches: last, once every model is served
    # Not collected first: at this point 45 objects of ~400k were garbage, and the walk (0.8 s
    # while the helper starts) would hold the event loop.
    heap.settle(collect=False)
    log.info("ready: %s", ", ".join(m.id for m in rt.listing(project="")))


async def shutdown(rt: Runtime) -> None:
    for chore in rt.chores:
        chore.cancel()
    if rt.batches is not None:  # before the engines: no batch request fails for their stop
        await rt.batches.stop()
    await stop_fine_tuning(rt)  # the training worker first: its job resumes on restart
    # Side by side: each waits for its own engine process to leave.
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in list(rt.models.values())))
    for embedder in rt.embedders.values():
        await asyncio.to_thread(embedder.batcher.stop)


def open_registry(rt: Runtime) -> ModelRegistry:
    store = None
    try:
        rt.database = open_database(Path(rt.config.storage.data_dir))
        store = ModelStore(rt.database)
    except Exception:  # noqa: BLE001 - serve without persistence rather than not at all
        log.exception("model registry storage failed; registrations will not persist")
    rt.registry = ModelRegistry(rt, rt.config, store)
    return rt.registry


RESTARTED = "the server stopped before this response finished; create it again"


def fail_unfinished_responses(rt: Runtime) -> None:
    """Background responses a server left queued or in progress (killed, or crashed: a
    SIGTERM's drain ends them itself) fail with RESTARTED rather than stay in progress for
    ever. Not run again: a client may have read some of their events already, which a new
    generation would contradict."""
    if rt.database is None:
        return
    try:
        failed = ResponseStore(rt.database).fail_unfinished(RESTARTED)
    except Exception:  # noqa: BLE001 - the model still serves; their polls say in_progress
        log.exception("marking unfinished background responses failed did not work")
        return
    if failed:
        log.warning("%d background responses left unfinished are failed: %s", len(failed),
                    ", ".join(failed))  # fmt: skip


def model_size(served: ServedModel, config: ServerConfig) -> int:
    from genserve.runtime.registry import estimate_bytes

    return estimate_bytes(str(served.path), "generate", config)


def load_embeddings(registry: ModelRegistry, config: ServerConfig) -> None:
    """The default embeddings model, when its package (genserve[embeddings]) is installed."""
    name = config.model.embedding_model
    if not name or name not in bundled_names():
        return
    try:
        registry.register(name, name, "embed", ModelSettings(), from_cli=True)
    except DomainError as e:
        log.error("embeddings model %s not loaded: %s", name, e.message)


async def serve_adapters(rt: Runtime, served: ServedModel) -> None:
    """--lora-modules, plus adapters bundled for a bundled base (genserve-starter-chat)."""
    modules = [(name, Path(path)) for name, path in rt.config.model.lora_modules]
    modules += bundled_adapters(rt.config.model.ref)
    for name, path in modules:
        spec = AdapterSpec(id=name, base=served.id, path=path, created=int(time.time()))
        await rt.register_adapter(spec)


async def start_fine_tuning(rt: Runtime) -> None:
    """Open the store, serve adapters from earlier runs, resume unfinished jobs.

    A storage problem (say, an unwritable data dir) disables files and jobs with a 503 that
    names it; it does not stop the server from serving its model.
    """
    config = rt.config
    try:
        data_dir = Path(config.storage.data_dir).resolve()
        rt.database = rt.database or open_database(data_dir)
        files = FileStore(rt.database, data_dir / "files")
        files.sweep()
        uploads = UploadStore(rt.database, data_dir / "uploads")
        uploads.sweep()
        rt.chores.append(asyncio.create_task(expire_files(files, uploads)))
        threads = config.training.threads
        manager = JobManager(
            JobStore(rt.database), files, rt, data_dir, threads, rt.training_launcher,
            device=config.training.device or config.model.device,
        )  # fmt: skip
        rt.files, rt.uploads = files, uploads
        rt.usage = UsageLedger(rt.database)
        rt.chores.append(asyncio.create_task(flush_usage(rt.usage)))
        rt.fine_tuning = manager
        rt.on_adapter_deleted.append(manager.on_adapter_deleted)
        rt.on_model_served.append(manager.on_model_served)
        await manager.start(resume=config.training.enabled)
    except Exception as e:  # noqa: BLE001 - reported by every files/jobs route
        log.exception("fine-tuning storage failed to start")
        rt.storage_error = f"{type(e).__name__}: {e}"


EXPIRY_SWEEP_S = 60.0  # files past their expires_after are invisible at once; bytes go here


async def expire_files(files: FileStore, uploads: UploadStore) -> None:
    """Delete expired files' rows and bytes, and the parts of uploads that ended or expired,
    every minute while the server runs."""
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        try:
            if gone := await asyncio.to_thread(files.delete_expired):
                log.info("deleted %d expired files", gone)
            await asyncio.to_thread(uploads.sweep)
        except Exception:  # noqa: BLE001 - a failed sweep is tried again at the next one
            log.exception("deleting expired files failed")


async def start_batches(rt: Runtime) -> None:
    """The Batch API's runner, on the files' storage; it resumes what a previous run left."""
    if rt.files is None or rt.database is None or rt.batch_handler is None:
        return  # no storage (its routes say why), or no API to run requests through
    rt.batches = BatchRunner(BatchStore(rt.database), rt.files, rt.batch_handler)
    await rt.batches.start()


async def flush_usage(usage: UsageLedger) -> None:
    """Write the usage counted in memory to the store every FLUSH_S seconds."""
    while True:
        await asyncio.sleep(FLUSH_S)
        try:
            await asyncio.to_thread(usage.flush)
        except Exception:  # noqa: BLE001 - kept in memory, written at the next flush
            log.exception("writing token usage failed")


async def stop_fine_tuning(rt: Runtime) -> None:
    if rt.fine_tuning is not None:
        await rt.fine_tuning.stop()
    if rt.usage is not None:
        try:
            rt.usage.flush()  # the requests drained before this: their counts are whole
        except Exception:  # noqa: BLE001 - the store may be what failed
            log.exception("writing token usage at shutdown failed")
    if rt.database is not None:
        rt.database.close()
