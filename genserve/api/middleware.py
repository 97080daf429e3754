"""The edge every request crosses: request ids, draining, body limits, API keys, rate limits.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and breaks streaming
responses' disconnect detection; here a stream passes through untouched.
"""

from __future__ import annotations

import contextvars
import json
import logging
import uuid
from dataclasses import dataclass, field

from genserve.api.auth import KeyStore
from genserve.api.errors import APIError

log = logging.getLogger("genserve.access")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@dataclass(slots=True)
class EdgeState:
    """Shared by the middleware and the shutdown logic."""

    keys: KeyStore | None
    exempt: tuple[str, ...]
    max_body: int
    draining: bool = False
    in_flight: int = 0
    notes: list[str] = field(default_factory=list)


class BodyTooLarge(Exception):
    pass


def is_exempt(path: str, exempt: tuple[str, ...]) -> bool:
    return any(path == e or (e != "/" and path.startswith(e + "/")) for e in exempt)


class EdgeMiddleware:
    def __init__(self, app, state: EdgeState) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        request_id_var.set(rid)
        extra: dict[str, str] = {"x-request-id": rid}
        try:
            self._check(scope, headers, extra)
        except APIError as e:
            return await self._reply(send, e, extra, scope)
        self.state.in_flight += 1
        body = receive if is_upload(scope) else self._limited(receive)
        try:
            await self.app(scope, body, self._with_headers(send, extra, scope))
        except BodyTooLarge:
            await self._reply(send, too_large(self.state.max_body), extra, scope)
        finally:
            self.state.in_flight -= 1

    def _check(self, scope, headers: dict[str, str], extra: dict[str, str]) -> None:  # noqa: ANN001
        if self.state.draining:
            raise APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
        size = headers.get("content-length")
        too_big = size is not None and size.isdigit() and int(size) > self.state.max_body
        if too_big and not is_upload(scope):
            raise too_large(self.state.max_body)
        keys = self.state.keys
        if keys is None or is_exempt(scope["path"], self.state.exempt):
            return
        caller = keys.verify(headers.get("authorization"))
        scope.setdefault("state", {})["caller"] = caller
        extra.update(keys.admit(caller))

    def _limited(self, receive):  # noqa: ANN001, ANN202
        seen = 0
        limit = self.state.max_body

        async def wrapped():  # noqa: ANN202
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return wrapped

    @staticmethod
    def _with_headers(send, extra: dict[str, str], scope):  # noqa: ANN001, ANN202
        async def wrapped(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                raw += [(k.encode(), v.encode()) for k, v in extra.items()]
                message = {**message, "headers": raw}
                log.info(
                    "%s %s %s", scope["method"], scope["path"], message["status"],
                    extra={"request_id": extra["x-request-id"]},
                )  # fmt: skip
            await send(message)

        return wrapped

    @staticmethod
    async def _reply(send, err: APIError, extra: dict[str, str], scope) -> None:  # noqa: ANN001
        body = json.dumps(err.body()).encode()
        headers = {**extra, **err.headers, "content-type": "application/json"}
        headers["content-length"] = str(len(body))
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})
        log.info("%s %s %s", scope["method"], scope["path"], err.status)


def is_upload(scope) -> bool:  # noqa: ANN001
    """/v1/files takes multipart uploads, bounded by their own (larger) limit."""
    return scope["path"].startswith("/v1/files")


def too_large(limit: int) -> APIError:
    return APIError(
        400, f"The request body exceeds {limit} bytes.", param=None, code="request_too_large"
    )
