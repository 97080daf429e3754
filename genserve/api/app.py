"""create_app(config): routes, error shapes, and a lifespan that loads the model off-loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from genserve import __version__
from genserve.api import (
    chat,
    completions,
    embeddings,
    errors,
    files,
    fine_tuning,
    models,
    playground,
    registry,
    tokenize,
)
from genserve.api.auth import LOCAL_PRINCIPAL, KeyStore
from genserve.api.errors import APIError
from genserve.api.limits import BackgroundPool
from genserve.api.metrics import Metrics
from genserve.api.middleware import EdgeMiddleware, EdgeState
from genserve.api.models import AdapterSpec, ModelSettings, ServedModel, Services
from genserve.api.registry import ModelRegistry, start_served
from genserve.bundled import bundled_adapters, bundled_names
from genserve.config import ServerConfig
from genserve.storage.db import open_database
from genserve.storage.models import ModelStore

log = logging.getLogger(__name__)

Loader = Callable[[ServerConfig], ServedModel]


def create_app(config: ServerConfig, loader: Loader | None = None) -> FastAPI:
    """`loader` builds the served model (default: genserve.server.build_served_model)."""
    if loader is None:
        from genserve.server import build_served_model as loader

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc: Services = app.state.services
        task = asyncio.create_task(_load(svc, config, loader))
        try:
            yield
        finally:
            task.cancel()
            await fine_tuning.stop(svc)  # the training worker first: its job resumes on restart
            for served in svc.models.values():
                await asyncio.to_thread(served.engine.stop)
            for embedder in svc.embedders.values():
                await asyncio.to_thread(embedder.batcher.stop)
            app.state.background.shutdown()

    app = FastAPI(title="genserve", version=__version__, lifespan=lifespan)
    app.state.services = Services()
    app.state.config = config
    app.state.metrics = Metrics(app.state.services)
    app.state.services.state["metrics"] = app.state.metrics
    app.state.edge = edge_state(config)
    app.state.background = BackgroundPool()
    app.add_middleware(EdgeMiddleware, state=app.state.edge)
    errors.install(app)
    app.include_router(models.router)
    app.include_router(registry.router)
    app.include_router(embeddings.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(playground.router)
    app.add_api_route("/health", health, methods=["GET"], responses=HEALTH_RESPONSES)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    install_openapi(app)
    return app


def install_openapi(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = errors.document_errors(schema)
        return app.openapi_schema

    app.openapi = openapi


HEALTH_SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ok", "loading", "failed", "no_model"]},
        "error": {"type": ["string", "null"]},
        "models": {"type": "object"},
    },
    "required": ["status"],
}
HEALTH_RESPONSES = {
    200: {"description": "Ready", "content": {"application/json": {"schema": HEALTH_SCHEMA}}},
    503: {
        "description": "Loading, failed, no generative model loaded, or shutting down",
        "content": {"application/json": {"schema": HEALTH_SCHEMA}},
    },
}


def edge_state(config: ServerConfig) -> EdgeState:
    sec = config.security
    keys = None
    if sec.auth_enabled:
        key_file = Path(sec.api_key_file) if sec.api_key_file else None
        keys = KeyStore(sec.api_keys, key_file, sec.admin_keys)
    return EdgeState(
        keys=keys, exempt=sec.exempt_paths, max_body=sec.max_request_bytes,
        max_file_bytes=config.storage.max_file_bytes, upload_slack=files.MULTIPART_SLACK,
    )  # fmt: skip


async def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _load(svc: Services, config: ServerConfig, loader: Loader) -> None:
    svc.state["loop"] = asyncio.get_running_loop()
    reg = open_registry(svc, config)
    try:
        served = await asyncio.to_thread(loader, config)
    except Exception as e:  # noqa: BLE001 - reported on /health and every route
        log.exception("model failed to load")
        svc.load_error = str(e)
        return
    served.ref = config.model.ref
    served.settings = reg.adopt(served.id, served.ref, "generate", _size(served, config))
    await start_served(svc, served)
    try:
        await _serve_adapters(svc, served, config)
    except Exception as e:  # noqa: BLE001 - an adapter the operator asked for must not be skipped
        log.exception("adapter failed to load")
        svc.load_error = f"adapter failed to load: {e}"
        return
    await fine_tuning.start(svc, config)  # files, jobs; serves fine-tuned adapters again
    _load_embeddings(reg, config)
    await reg.restore()  # models registered through the API before a restart
    svc.ready = True
    log.info("ready: %s", ", ".join(m["id"] for m in svc.cards(LOCAL_PRINCIPAL)))


def open_registry(svc: Services, config: ServerConfig) -> ModelRegistry:
    store = None
    try:
        db = open_database(Path(config.storage.data_dir))
        svc.state["database"] = db
        store = ModelStore(db)
    except Exception:  # noqa: BLE001 - serve without persistence rather than not at all
        log.exception("model registry storage failed; registrations will not persist")
    registry = ModelRegistry(svc, config, store)
    svc.state["registry"] = registry
    return registry


def _size(served: ServedModel, config: ServerConfig) -> int:
    from genserve.model.sizing import kv_cache_bytes, weight_bytes

    return 2 * weight_bytes(served.path) + kv_cache_bytes(served.path, config.engine)


def _load_embeddings(registry: ModelRegistry, config: ServerConfig) -> None:
    """The default embeddings model, when its package (genserve[embeddings]) is installed."""
    name = config.model.embedding_model
    if not name or name not in bundled_names():
        return
    try:
        registry.register(name, name, "embed", ModelSettings(), from_cli=True)
    except APIError as e:
        log.error("embeddings model %s not loaded: %s", name, e.message)


async def _serve_adapters(svc: Services, served: ServedModel, config: ServerConfig) -> None:
    """--lora-modules, plus adapters bundled for a bundled base (genserve-starter-chat)."""
    modules = [(name, Path(path)) for name, path in config.model.lora_modules]
    modules += bundled_adapters(config.model.ref)
    for name, path in modules:
        spec = AdapterSpec(id=name, base=served.id, path=path, created=int(time.time()))
        await svc.register_adapter(spec)


async def health(request: Request) -> JSONResponse:
    """200 when every model is loaded; 503 while loading, after a failed load, and once the
    last generative model has been unloaded (nothing could answer a completion)."""
    svc: Services = request.app.state.services
    if svc.ready and not svc.models:
        error = "no generative model is loaded: register one with POST /v1/models"
        return JSONResponse({"status": "no_model", "error": error}, status_code=503)
    if svc.ready:
        stats = {m.id: m.engine.stats() for m in svc.models.values()}
        body = {
            "status": "ok",
            "models": {
                mid: {"running": s.num_running, "waiting": s.num_waiting, "steps": s.steps}
                for mid, s in stats.items()
            },
        }
        return JSONResponse(body)
    status = "failed" if svc.load_error else "loading"
    return JSONResponse({"status": status, "error": svc.load_error}, status_code=503)
