"""HTTP over Ray handles: the edge turns a request into an HTTPRequest, a replica runs it
through its own genserve ASGI app and streams back a ResponseStart then body chunks.

No Ray import here: this is plain ASGI, testable without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from genserve.api.errors import APIError

log = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
APP_EXIT_GRACE_S = 5.0  # after the response (or a disconnect), how long the app may tidy up


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """One buffered HTTP request, as the edge received it."""

    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json_model(self) -> str | None:
        """The `model` field of a JSON body, or None (not JSON, no such field, unreadable)."""
        model = self.json_field("model")
        return model if isinstance(model, str) else None

    def json_field(self, name: str) -> Any:  # noqa: ANN401 - whatever the body holds
        """A top-level field of a JSON POST body; None where there is none or no JSON."""
        if self.method != "POST" or b"json" not in (self.header(b"content-type") or b""):
            return None
        try:
            return json.loads(self.body).get(name)
        except (ValueError, AttributeError):
            return None


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """The status line and headers; body chunks (bytes) follow it on the same stream."""

    status: int
    headers: Headers


BridgeItem = ResponseStart | bytes


def request_scope(req: HTTPRequest) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": req.http_version,
        "method": req.method,
        "scheme": req.scheme,
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query_string,
        "root_path": "",
        "headers": list(req.headers),
        "client": req.client,
        "server": None,
        "state": {},
    }


async def call_app(
    app: ASGIApp, req: HTTPRequest, extra: Headers = ()
) -> AsyncIterator[BridgeItem]:
    """Run one request through an ASGI app in this process; yield what it sends.

    The app sees the whole body at once, then a receive() that waits: it answers
    `http.disconnect` only when the caller stops reading (a client that went away), which is
    how a streaming route learns to abort its engine request.
    """
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.create_task(app(request_scope(req), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        async for item in _relay(messages, extra):
            yield item
    finally:
        gone.set()
        await _settle(task)


async def _relay(messages: asyncio.Queue, extra: Headers) -> AsyncIterator[BridgeItem]:
    started = False
    while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
            started = True
            yield ResponseStart(message["status"], tuple(message.get("headers", ())) + extra)
        elif message["type"] == "http.response.body":
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return
    if not started:  # the app ended (or crashed) without answering
        err = APIError(500, "The server had an error while processing your request.")
        body = json.dumps(err.body()).encode()
        yield ResponseStart(500, ((b"content-type", b"application/json"), *extra))
        yield body


async def _settle(task: asyncio.Task) -> None:
    """Let the app finish (it may be aborting an engine request), and log what it raised."""
    if not task.done():
        try:
            await asyncio.wait_for(asyncio.shield(task), APP_EXIT_GRACE_S)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception() if task.done() else None
        if exc is not None:
            log.error("request raised", exc_info=exc)


async def read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def reply_error(send: Callable, err: APIError) -> None:
    """An OpenAI-shaped error answered by the edge itself."""
    body = json.dumps(err.body()).encode()
    headers = {**err.headers, "content-type": "application/json", "content-length": str(len(body))}
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Callable, send: Callable) -> None:
    """The edge holds no state of its own: start-up and shut-down are immediate."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
