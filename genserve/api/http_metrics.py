"""HTTP metrics: every answer counted by method, route template and status, and timed to the
end of its body (a stream's too). The outermost middleware, so the edge's own answers count:
a 401, a 429 (rate limit or capacity), a 503 while draining, an oversize body's 400.

Not prometheus-fastapi-instrumentator, though its metric names are the ones used here (vLLM
exposes them through it): a path no route matches, but that would with its trailing slash
toggled, is labelled with the raw path there, so `GET /v1/files/<anything>/` (a 307, or a 401
without a key) made one new series per id sent: any client, no key needed, could grow the
server's memory and every scrape without bound. Here a label is a route template or `none`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from starlette.routing import BaseRoute, Match

from genserve.api.metrics import Metrics

# Not traffic: Prometheus' scrapes and the probes (as vLLM leaves them out).
EXCLUDED = ("/metrics", "/health")
# A method outside these is labelled OTHER: the client chooses it, so it must not add series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "none"  # as the instrumentator groups what no route template matches


class RouteLabels:
    """The route template a request matches, as the router would pick it: the first full
    match (path and method), else the first whose path matches (a 405), else `none`."""

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        # Mounts included (`/static`): their path is the label of everything under them.
        self.routes = [r for r in routes if isinstance(getattr(r, "path", None), str)]

    def __call__(self, scope: dict) -> str:
        # Matched on a copy: matching a route writes its path parameters into the scope.
        probe = {k: scope[k] for k in ("type", "path", "method", "root_path") if k in scope}
        partial = None
        for route in self.routes:
            match, _ = route.matches(probe)
            if match is Match.FULL:
                return route.path
            if match is Match.PARTIAL and partial is None:
                partial = route.path
        return partial or UNMATCHED


class HttpMetrics:
    """Pure ASGI, like the edge (a stream passes through untouched); it only reads the
    status as it goes by."""

    def __init__(self, app, metrics: Metrics, labels: RouteLabels) -> None:  # noqa: ANN001
        self.app = app
        self.metrics = metrics
        self.labels = labels

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http" or scope["path"] in EXCLUDED:
            return await self.app(scope, receive, send)
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        handler = self.labels(scope)
        status = 500  # what the client gets when the app raises before answering
        start = time.perf_counter()

        async def watched(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.metrics.http_answered(method, handler, status, time.perf_counter() - start)
