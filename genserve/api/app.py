"""create_app(config): routes, error shapes, and a lifespan that loads the model off-loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from genserve import __version__
from genserve.api import chat, completions, errors, models, tokenize
from genserve.api.models import AdapterSpec, ServedModel, Services
from genserve.bundled import bundled_adapters
from genserve.config import ServerConfig

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
            for served in svc.models.values():
                await asyncio.to_thread(served.engine.stop)

    app = FastAPI(title="genserve", version=__version__, lifespan=lifespan)
    app.state.services = Services()
    app.state.config = config
    errors.install(app)
    app.include_router(models.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.add_api_route("/health", health, methods=["GET"])
    return app


async def _load(svc: Services, config: ServerConfig, loader: Loader) -> None:
    try:
        served = await asyncio.to_thread(loader, config)
    except Exception as e:  # noqa: BLE001 - reported on /health and every route
        log.exception("model failed to load")
        svc.load_error = str(e)
        return
    served.engine.start()
    svc.models[served.id] = served
    try:
        await _serve_adapters(svc, served, config)
    except Exception as e:  # noqa: BLE001 - an adapter the operator asked for must not be skipped
        log.exception("adapter failed to load")
        svc.load_error = f"adapter failed to load: {e}"
        return
    svc.ready = True
    log.info("ready: %s", ", ".join(m["id"] for m in svc.cards()))


async def _serve_adapters(svc: Services, served: ServedModel, config: ServerConfig) -> None:
    """--lora-modules, plus adapters bundled for a bundled base (genserve-starter-chat)."""
    modules = [(name, Path(path)) for name, path in config.model.lora_modules]
    modules += bundled_adapters(config.model.ref)
    for name, path in modules:
        spec = AdapterSpec(id=name, base=served.id, path=path, created=int(time.time()))
        await svc.register_adapter(spec)


async def health(request: Request) -> JSONResponse:
    """200 when every model is loaded; 503 while loading or after a failed load."""
    svc: Services = request.app.state.services
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
