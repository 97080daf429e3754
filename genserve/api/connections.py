"""Connection limits uvicorn lacks: a deadline for a request's headers, a bound on their size,
and a cap on open connections that sheds idle and half-sent ones first.

Why not uvicorn's own options: it times out idle keep-alive connections (`timeout_keep_alive`,
set from ConnectionConfig.keep_alive_s) but nothing bounds the time a request may take to send
its headers, so a client that sends half a request line and stops holds its socket forever
(slowloris: 1,100 of them used up the process's file descriptors and /health failed).
`limit_concurrency` makes it worse: it counts those half-open connections and answers every
*complete* request with a plain-text 503 once they fill it. httptools, uvicorn's parser when
installed, has no header size limit either (`h11_max_incomplete_event_size` is h11's only).

So each connection here gets a deadline (header_timeout_s) from its opening, and again from the
first byte of each later request, to the end of that request's headers; missing it closes the
connection. At max_connections a new connection closes the oldest one that is not inside a
request (half-sent or idle); only when every open connection is serving a request is the new
one answered 503 in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from genserve.api.errors import error_body
from genserve.config import ConnectionConfig

log = logging.getLogger(__name__)
REFUSED_GRACE_S = 1.0  # a refused connection's 503 is read before the socket is closed


class ConnectionGuard:
    """The open connections of one server, oldest first; shared by its protocol instances."""

    def __init__(self, limits: ConnectionConfig) -> None:
        self.limits = limits
        self.open: dict[Any, None] = {}  # insertion-ordered: the first is the oldest

    def admit(self, conn: Any) -> bool:
        """Room for `conn`, closing the oldest idle one if the cap is reached; False if none."""
        if len(self.open) >= self.limits.max_connections:
            victim = next((c for c in self.open if c.between_requests()), None)
            if victim is None:
                return False
            self.forget(victim)
            victim.transport.close()
        self.open[conn] = None
        return True

    def forget(self, conn: Any) -> None:
        self.open.pop(conn, None)


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, written before (or instead of) any request."""
    body = json.dumps(error_body(status, message, None, code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardMixin:
    """Mixed in before uvicorn's HTTP protocol class (see guarded_protocol)."""

    guard: ConnectionGuard
    # Set by uvicorn's protocol: the transport, its loop, and the current request's cycle.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._refused = not self.guard.admit(self)
        if self._refused:
            self._refuse()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # its 503 is on its way; what it sends is not read
        if self.between_requests():
            if self._deadline is None:
                self._arm()  # the first byte of a new request on a kept-alive connection
            # Counted before the parser sees them: whole headers in one read (a 70 kB header
            # in one packet) were parsed, and answered, before they could be counted.
            self._header_bytes += _head_part(data)
            if self._header_bytes > self.guard.limits.max_header_bytes:
                self._close_with(431, "Request Header Fields Too Large", "headers_too_large")
                return
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete: its task runs
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def between_requests(self) -> bool:
        """Not inside a request: before its headers end, or idle after a response."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.guard.limits.header_timeout_s, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._header_bytes = 0

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.between_requests() and not self.transport.is_closing():
            log.debug("closing a connection whose request headers did not arrive in time")
            self.transport.close()

    def _close_with(self, status: int, reason: str, code: str) -> None:
        message = f"The request line and headers exceed {self.guard.limits.max_header_bytes} bytes."
        self.transport.write(raw_error(status, reason, message, code))
        self.transport.close()

    def _refuse(self) -> None:
        message = "The server has too many open connections; retry shortly."
        self.transport.write(raw_error(503, "Service Unavailable", message, "too_many_connections"))
        # Closed after a grace: closing a socket with unread request bytes sends a reset, which
        # could destroy the 503 before the client reads it.
        self.loop.call_later(REFUSED_GRACE_S, self.transport.close)


def _head_part(data: bytes) -> int:
    """How much of `data` is request line and headers: up to their blank line, if it is here
    (the body after it is not theirs)."""
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def guarded_protocol(limits: ConnectionConfig) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, or h11 without it) with a guard of its own."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    guard = ConnectionGuard(limits)
    return type("GuardedHTTPProtocol", (GuardMixin, AutoHTTPProtocol), {"guard": guard})
