"""The edge every request crosses: request ids, draining, body limits, API keys, rate limits.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and breaks streaming
responses' disconnect detection; here a stream passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from genserve.api.auth import Caller, KeyStore
from genserve.api.errors import APIError, bad_request
from genserve.logs import printable
from genserve.runtime.json_text import field_name, lone_surrogate_at

log = logging.getLogger("genserve.access")
BODY_METHODS = ("POST", "PUT", "PATCH")
# A \uD800-\uDFFF escape: the only way a JSON body can carry a surrogate (raw, one is not UTF-8).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# A client's x-request-id is echoed and logged: anything beyond these characters is replaced.
REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}")
Linger = Callable[[], Awaitable[None]] | None
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class SharedLimits(Protocol):
    """Rate limits kept outside this process, so that several replicas of the app count
    against one window per key (genserve.ray.limits); None: the KeyStore's own windows."""

    async def admit(self, caller: Caller) -> dict[str, str]: ...

    def spend(self, caller: Caller, tokens: int) -> None: ...


@dataclass(slots=True)
class EdgeState:
    """Shared by the middleware and the shutdown logic."""

    keys: KeyStore | None
    exempt: tuple[str, ...]
    max_body: int
    max_file_bytes: int = 2**62  # /v1/files: the file's limit; its body may be larger by
    upload_slack: int = 1 << 20  # room for the multipart boundaries and part headers
    # After an oversize upload's 400: the rest of its body is read and dropped, up to these,
    # before the connection closes (see EdgeMiddleware._linger).
    linger_bytes: int = 64 << 20
    linger_s: float = 10.0
    linger_idle_s: float = 1.0  # a client that stops sending is closed on sooner
    draining: bool = False
    in_flight: int = 0
    limits: SharedLimits | None = None
    notes: list[str] = field(default_factory=list)


class BodyTooLarge(Exception):
    pass


class UploadTooLarge(Exception):
    pass


def decode_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header values as text; a byte that is not UTF-8 is the client's error, a 400."""
    headers = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError:
            raise APIError(
                400, f"The value of header {printable(name)!r} is not UTF-8 text.",
                code="invalid_header",
            ) from None  # fmt: skip
    return headers


def request_id(headers: dict[str, str]) -> str:
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def is_exempt(path: str, exempt: tuple[str, ...]) -> bool:
    return any(path == e or (e != "/" and path.startswith(e + "/")) for e in exempt)


class EdgeMiddleware:
    def __init__(self, app, state: EdgeState) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra: dict[str, str] = {"x-request-id": uuid.uuid4().hex}
        try:
            headers = decode_headers(scope["headers"])
            extra["x-request-id"] = request_id(headers)
            request_id_var.set(extra["x-request-id"])
            caller = self._check(scope, headers, extra)
            if caller is not None:
                extra.update(await self._admit(caller))
        except APIError as e:
            return await self._reply(send, e, extra, scope)
        self.state.in_flight += 1
        body = self._body(scope, receive)
        try:
            if scope["method"] in BODY_METHODS and not is_upload(scope):
                body, err = await self._checked_text(body)
                if err is not None:
                    return await self._reply(send, err, extra, scope)
            await self.app(scope, body, self._with_headers(send, extra, scope))
        except BodyTooLarge:
            await self._reply(send, too_large(self.state.max_body), extra, scope)
        except UploadTooLarge:
            # Answered before the rest of the body is read: the connection cannot be reused.
            extra["connection"] = "close"
            err = upload_too_large(self.state.max_file_bytes)
            await self._reply(send, err, extra, scope, lambda: self._linger(receive))
        finally:
            self.state.in_flight -= 1

    @staticmethod
    async def _checked_text(receive):  # noqa: ANN001, ANN205
        """The body read whole (FastAPI reads it whole anyway; the size limit holds) and handed
        on as it came, or the 400 for a lone surrogate in any of its strings or keys.

        Why here: JSON can spell one (`"\\ud800"`), it decodes to a str no tokenizer, JSON
        encoder or database takes, and each field a check missed answered 500 (a model id
        echoed in a 404, tool arguments, metadata, an id looked up in SQLite: 25 requests in
        one sweep). One look at every JSON body covers the fields to come too; a body without
        a surrogate escape is only searched for one."""
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        err = None
        if SURROGATE_ESCAPE.search(data):
            try:
                at = lone_surrogate_at(json.loads(data))
            except ValueError:
                at = None  # not JSON: the route answers that
            if at is not None:
                where = field_name(at)
                what = f"`{where}`" if where else "the body"
                msg = f"{what} holds a lone surrogate (an unpaired \\u escape), which is not text"
                err = bad_request(msg, param=where)

        async def replayed():  # noqa: ANN202 - then the client's disconnect, as it comes
            return messages.pop(0) if messages else await receive()

        return replayed, err

    def _body(self, scope, receive):  # noqa: ANN001, ANN202
        if is_upload(scope):
            limit = self.state.max_file_bytes + self.state.upload_slack
            return self._limited(receive, limit, UploadTooLarge)
        return self._limited(receive, self.state.max_body, BodyTooLarge)

    def _check(self, scope, headers: dict[str, str], extra: dict[str, str]) -> Caller | None:  # noqa: ANN001, E501
        if self.state.draining:
            raise APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
        size = headers.get("content-length")
        too_big = size is not None and size.isdigit() and int(size) > self.state.max_body
        if too_big and not is_upload(scope):
            raise too_large(self.state.max_body)
        keys = self.state.keys
        if keys is None or is_exempt(scope["path"], self.state.exempt):
            return None
        caller = keys.verify(headers.get("authorization"))
        scope.setdefault("state", {})["caller"] = caller
        return caller

    async def _admit(self, caller: Caller) -> dict[str, str]:
        """Count the request against its key's limits: here, or where they are shared."""
        if self.state.limits is not None:
            return await self.state.limits.admit(caller)
        assert self.state.keys is not None  # a caller exists only when keys do
        return self.state.keys.admit(caller)

    async def _linger(self, receive) -> None:  # noqa: ANN001
        """Read and drop what the client still sends of its body, within linger_bytes and
        linger_s (linger_idle_s without a byte ends it sooner). Closing a socket with unread
        bytes in it sends a reset, and a reset can destroy the answer before the client reads
        it: a client still sending a 24 MiB upload got ConnectionResetError instead of its
        400 (most clients read only once they have sent everything). Nothing is kept, so this
        costs the server no memory or disk."""
        deadline = time.monotonic() + self.state.linger_s
        dropped = 0
        while dropped <= self.state.linger_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), min(left, self.state.linger_idle_s))
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return  # the body ended, or the client left
            dropped += len(message.get("body", b""))

    @staticmethod
    def _limited(receive, limit: int, error: type[Exception]):  # noqa: ANN001, ANN205
        """Counts the body as it streams, with or without a content-length (chunked)."""
        seen = 0

        async def wrapped():  # noqa: ANN202
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise error()
            return message

        return wrapped

    @staticmethod
    def _with_headers(send, extra: dict[str, str], scope):  # noqa: ANN001, ANN202
        async def wrapped(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                raw += [(k.encode(), v.encode()) for k, v in extra.items()]
                message = {**message, "headers": raw}
                log_access(scope, message["status"], extra["x-request-id"])
            await send(message)

        return wrapped

    @staticmethod
    async def _reply(
        send,  # noqa: ANN001
        err: APIError,
        extra: dict[str, str],
        scope,  # noqa: ANN001
        linger: Linger = None,
    ) -> None:
        """The error in OpenAI's shape. `linger`, when given, runs once the whole answer is
        written and before the response ends (ending it is what closes the connection)."""
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
        await send({"type": "http.response.body", "body": body, "more_body": linger is not None})
        log_access(scope, err.status, extra["x-request-id"])
        if linger is not None:
            await linger()
            await send({"type": "http.response.body", "body": b""})


def log_access(scope, status: int, rid: str) -> None:  # noqa: ANN001 - an ASGI scope
    """One line per answer, naming the request id it carries, so that a client quoting its
    x-request-id finds its line. In the message, not only in `extra`: the log's format is
    shared with loggers that set no request_id. The path is escaped (a client's path cannot
    forge a line); the id needs no escaping, REQUEST_ID admits no control character."""
    path = printable(scope["path"])
    log.info("%s %s %s request_id=%s", scope["method"], path, status, rid,
             extra={"request_id": rid})  # fmt: skip


def is_upload(scope) -> bool:  # noqa: ANN001
    """/v1/files and an upload's parts take multipart bodies, bounded by their own (larger)
    limit."""
    path = scope["path"]
    return path.startswith("/v1/files") or (
        path.startswith("/v1/uploads/") and path.endswith("/parts")
    )


def too_large(limit: int) -> APIError:
    return APIError(
        400, f"The request body exceeds {limit} bytes.", param=None, code="request_too_large"
    )


def upload_too_large(limit: int) -> APIError:
    """As /v1/files answers a declared oversize upload (genserve.api.files.too_large)."""
    return APIError(
        400, f"The file is too large: this server accepts files of at most {limit} bytes.",
        param="file", code="file_too_large",
    )  # fmt: skip
