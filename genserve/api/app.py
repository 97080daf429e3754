"""create_app(config): routes, error shapes, and a lifespan that loads the model off-loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from genserve import __version__
from genserve.api import (
    batches,
    chat,
    completions,
    conversations,
    embeddings,
    errors,
    files,
    fine_tuning,
    models,
    playground,
    registry,
    responses,
    scoring,
    stored_completions,
    tokenize,
    uploads,
    usage,
)
from genserve.api.auth import KeyStore
from genserve.api.http_metrics import HttpMetrics, RouteLabels
from genserve.api.metrics import Metrics
from genserve.api.middleware import EdgeMiddleware, EdgeState
from genserve.api.responses_background import BackgroundResponses
from genserve.config import ServerConfig
from genserve.runtime import lifecycle
from genserve.runtime.lifecycle import Loader
from genserve.runtime.models import ServedModel
from genserve.runtime.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, loader: Loader | None = None) -> FastAPI:
    """`loader` builds the served model (default: genserve.runtime.build.build_served_model)."""
    load = loader or lifecycle.default_loader

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt: Runtime = app.state.runtime
        task = asyncio.create_task(lifecycle.load(rt, load))
        try:
            yield
        finally:
            task.cancel()
            await app.state.background.stop()  # what the drain left fails, stored while it can
            await lifecycle.shutdown(rt)

    app = FastAPI(title="genserve", version=__version__, lifespan=lifespan)
    rt = Runtime(config)
    app.state.runtime = rt
    app.state.config = config
    app.state.metrics = Metrics(rt)
    rt.metrics = app.state.metrics
    rt.batch_handler = batches.batch_handler(rt)
    app.state.edge = edge_state(config)
    app.state.background = BackgroundResponses(app.state.edge)
    app.add_middleware(EdgeMiddleware, state=app.state.edge)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_api_route("/health", health, methods=["GET"], responses=HEALTH_RESPONSES)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    install_openapi(app)
    # Added last, so outermost: the edge's own refusals are counted too.
    app.add_middleware(HttpMetrics, metrics=app.state.metrics, labels=route_labels(app))
    return app


ROUTERS = (
    models.router, registry.router, embeddings.router, scoring.router, completions.router,
    chat.router, stored_completions.router, responses.router, conversations.router,
    tokenize.router, files.router, uploads.router, fine_tuning.router, batches.router,
    usage.router, playground.router,
)  # fmt: skip


def route_labels(app: FastAPI) -> RouteLabels:
    """The app's own routes (docs, /health, /metrics), then the included routers' routes:
    FastAPI lists an included router as one entry without a path (RouteLabels skips it), so
    they are read from the routers themselves, none of which has a prefix."""
    return RouteLabels([*app.routes, *(r for router in ROUTERS for r in router.routes)])


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
        "status": {
            "type": "string",
            "enum": ["ok", "loading", "failed", "no_model", "engine_failed"],
        },
        "error": {"type": ["string", "null"]},
        "models": {"type": "object"},
        "loading": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["status"],
}
HEALTH_RESPONSES = {
    200: {"description": "Ready", "content": {"application/json": {"schema": HEALTH_SCHEMA}}},
    503: {
        "description": "Loading, failed, no generative model loaded, an engine process died, "
        "or shutting down",
        "content": {"application/json": {"schema": HEALTH_SCHEMA}},
    },
}


def edge_state(config: ServerConfig) -> EdgeState:
    sec = config.security
    keys = None
    if sec.auth_enabled:
        key_file = Path(sec.api_key_file) if sec.api_key_file else None
        hashes = tuple((h, "member") for h in sec.api_key_hashes)
        hashes += tuple((h, "admin") for h in sec.admin_key_hashes)
        keys = KeyStore(sec.api_keys, key_file, sec.admin_keys, hashes)
    return EdgeState(
        keys=keys, exempt=sec.exempt_paths, max_body=sec.max_request_bytes,
        max_file_bytes=config.storage.max_file_bytes, upload_slack=files.MULTIPART_SLACK,
    )  # fmt: skip


async def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def _health_of(served: ServedModel) -> dict:
    s = served.engine.stats()
    # engine_pid: the process to watch (or profile) for this model's engine; grammar: whether
    # its grammar checker (a helper process) has loaded; compiled_decode: --compile-decode's
    # graph ("compiling" while the engine serves eager, then "ready"; "off" without it).
    return {"running": s.num_running, "waiting": s.num_waiting, "steps": s.steps,
            "engine_pid": served.engine.pid, "grammar": served.grammars.state,
            "compiled_decode": s.compiled_decode}  # fmt: skip


async def health(request: Request) -> JSONResponse:
    """200 when every model is loaded; 503 while loading, after a failed load, once the last
    generative model has been unloaded (nothing could answer a completion), and once a model's
    engine process has died (an operator restarts the server)."""
    rt: Runtime = request.app.state.runtime
    if rt.ready and not rt.models:
        error = "no generative model is loaded: register one with POST /v1/models"
        return JSONResponse({"status": "no_model", "error": error}, status_code=503)
    failed = {m.id: m.engine.failure for m in rt.models.values() if m.engine.failure}
    if rt.ready and failed:
        error = "; ".join(f"{mid}: {why}" for mid, why in failed.items())
        return JSONResponse({"status": "engine_failed", "error": error}, status_code=503)
    if rt.ready:
        # loading: models still loading beside those that serve (the default embeddings model
        # loads once the server is ready; it takes the cores for about a second)
        loading = sorted(m.id for m in rt.pending.values() if m.status == "loading")
        models = {m.id: _health_of(m) for m in rt.models.values()}
        return JSONResponse({"status": "ok", "models": models, "loading": loading})
    status = "failed" if rt.load_error else "loading"
    return JSONResponse({"status": status, "error": rt.load_error}, status_code=503)
