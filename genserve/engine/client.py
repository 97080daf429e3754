"""AsyncEngine: the asyncio face of the engine (a thread, or a process of its own). open(group)
-> one stream of deltas."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, Protocol

from genserve.engine.core import STOPPED, AdapterOp
from genserve.engine.scheduler import QueueFullError
from genserve.engine.types import (
    EngineStats,
    FailureKind,
    FinishReason,
    Request,
    RequestFailure,
    TokenDelta,
)

# One API call (its prompts x best_of, or n) may hold at most this share of the engine's slots,
# so a single caller cannot take every slot (18 prompts x best_of 16 did); at least one.
GROUP_SLOT_SHARE = 0.5


class Core(Protocol):
    """The engine loop as AsyncEngine drives it: genserve.engine.core.EngineCore on a thread of
    this process, or genserve.engine.process.EngineProcess in a child process."""

    publish: Callable[[Sequence[TokenDelta]], None]  # set before start; called off the loop

    failure: str | None  # why it can no longer run requests (its process died)

    @property
    def num_slots(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, request: Request) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def submit_adapter_op(self, op: AdapterOp) -> None: ...

    def stats(self) -> EngineStats: ...


class Observer(Protocol):
    """Sees every delta as it arrives (metrics); must be quick, it runs on the event loop."""

    def on_delta(self, request: Request, delta: TokenDelta) -> None: ...

    def on_abandon(self, request: Request) -> None: ...


class ContextLengthError(ValueError):
    """Prompt plus max_tokens do not fit in the model's context."""


@dataclass(slots=True)
class Flight:
    """The event-loop side of one request in flight: the request, and the queue of the group
    (the n choices of one call) its deltas go to. One record per request id, forgotten in one
    place (AsyncEngine._forget). The engine thread keeps its own (EngineCore.live)."""

    request: Request
    queue: asyncio.Queue[TokenDelta]


class GroupStream:
    """The deltas of one group of requests, in arrival order, until all have finished.

    A request the engine ended early (ABORT) raises EngineError. close() (or aclose(), or
    leaving early) aborts in the engine whatever has not finished; it is safe to call at any
    time, even before the first delta, and more than once.
    """

    def __init__(self, engine: AsyncEngine, requests: Sequence[Request]) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.unfinished = {r.request_id for r in requests}
        self._failure: RequestFailure | None = None  # raised at the next delta asked for

    def __aiter__(self) -> GroupStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._failure is not None:
            self._fail(self._failure)
        if not self.unfinished:
            raise StopAsyncIteration
        delta = await self.queue.get()
        if delta.finished:
            self.unfinished.discard(delta.request_id)
        if delta.finish_reason is FinishReason.ABORT:
            failure = delta.error or RequestFailure(DROPPED)
            if not delta.token_ids:
                self._fail(failure)
            # Tokens it held (Request.publish_every) go out first, then the error.
            self._failure = failure
            return replace(delta, finish_reason=None, error=None)
        return delta

    def _fail(self, failure: RequestFailure) -> NoReturn:
        self.close()
        raise EngineError(failure.message, failure)

    def close(self) -> None:
        for rid in self.unfinished:
            self.engine.release(rid)
        self.unfinished.clear()

    async def aclose(self) -> None:
        self.close()


class AsyncEngine:
    def __init__(self, core: Core, max_len: int, capacity: int) -> None:
        self.core = core
        self.max_len = max_len
        self.capacity = capacity  # running slots + waiting queue: more in flight gets 429
        self._flights: dict[str, Flight] = {}  # request id -> its one record on this side
        self._background = 0  # of those, Batch API requests (bounded by the batch runner)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.observer: Observer | None = None  # metrics, set by the API

    @property
    def max_group(self) -> int:
        """The most sequences one API call may run (see GROUP_SLOT_SHARE)."""
        return max(1, int(self.core.num_slots * GROUP_SLOT_SHARE))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.publish = self._publish
        self.core.start()

    def stop(self) -> None:
        """Stop the engine; every request still in flight ends with an error (never hangs).
        Callable from any thread."""
        self._stopped = True
        self.core.stop()  # the engine thread fails what it holds, then exits
        if self._loop is not None and not self._loop.is_closed():
            # What it never saw (or a thread that did not exit in time) ends here too.
            self._loop.call_soon_threadsafe(self._fail_open, STOPPED)

    def cut(self, error: RequestFailure) -> None:
        """End every request in flight now with `error`; the engine itself stays up (SIGTERM's
        drain timeout passed: streams end with an error event, not a dropped connection).
        Callable from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cut, error)

    def _cut(self, error: RequestFailure) -> None:
        # Batch API requests are not cut: the batch runner stops them at shutdown without
        # recording a result, and they run again after a restart (cut, they were failures).
        held = [rid for rid, f in self._flights.items() if not f.request.background]
        self._fail(held, error)
        for rid in held:
            self.core.abort(rid)

    def _fail_open(self, error: RequestFailure) -> None:
        self._fail(list(self._flights), error)

    def _fail(self, request_ids: list[str], error: RequestFailure) -> None:
        """End these requests' streams with `error` (their records leave with the delta)."""
        for rid in request_ids:
            prompt = len(self._flights[rid].request.prompt_token_ids)
            self._dispatch([TokenDelta(rid, (), "", FinishReason.ABORT, prompt, 0, error=error)])

    @property
    def pid(self) -> int:
        """The process that runs the model (this one when the engine is a thread of it)."""
        return self.core.pid or os.getpid()

    @property
    def failure(self) -> str | None:
        """Why this engine can no longer run requests (its process died); None while it can."""
        return self.core.failure

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    def stats(self) -> EngineStats:
        return self.core.stats()

    async def add_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter between two engine steps; raises what loading raised."""
        await self._adapter_op(name, path)

    async def remove_adapter(self, name: str) -> None:
        await self._adapter_op(name, None)

    async def _adapter_op(self, name: str, path: Path | None) -> None:
        done: Future[None] = Future()
        self.core.submit_adapter_op(AdapterOp(name, path, done))
        await asyncio.wrap_future(done)

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens."
            )

    def open(self, requests: Sequence[Request]) -> GroupStream:
        """Admit a group (the n choices of one call) whole or not at all; its deltas come on
        one stream, each naming its request.

        Synchronous on purpose: the capacity check and the registration happen in one tick of
        the event loop, so concurrent calls cannot overshoot the bound.
        """
        if self._stopped:
            raise EngineError(STOPPED.message, STOPPED)
        if self.failure is not None:
            raise EngineError(self.failure, RequestFailure(self.failure, FailureKind.UNAVAILABLE))
        for r in requests:
            self.check_context(len(r.prompt_token_ids), r.params.max_tokens)
        # Background work never makes an interactive call 429: it does not count against it.
        interactive = not any(r.background for r in requests)
        in_flight = len(self._flights) - (self._background if interactive else 0)
        if in_flight + len(requests) > self.capacity:
            raise QueueFullError(f"the server is at capacity ({self.capacity} requests in flight)")
        stream = GroupStream(self, requests)
        for r in requests:
            self._flights[r.request_id] = Flight(r, stream.queue)
            self._background += r.background
            self.core.submit(r)
        return stream

    def release(self, rid: str) -> None:
        """Abort a request in the engine unless it already finished. Idempotent."""
        flight = self._forget(rid)
        if flight is not None:
            self.core.abort(rid)
            if self.observer is not None:
                self.observer.on_abandon(flight.request)

    def _forget(self, rid: str) -> Flight | None:
        """The one place a request's record leaves this side: finished, or abandoned."""
        flight = self._flights.pop(rid, None)
        if flight is not None:
            self._background -= flight.request.background
        return flight

    # -- called on the engine thread ---------------------------------------------------------
    def _publish(self, deltas: Sequence[TokenDelta]) -> None:
        # One hop to the event loop per step, not per token.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _dispatch(self, deltas: Sequence[TokenDelta]) -> None:
        for d in deltas:
            flight = self._forget(d.request_id) if d.finished else self._flights.get(d.request_id)
            if flight is None:  # abandoned: its stream was closed
                continue
            flight.queue.put_nowait(d)
            if self.observer is not None:
                self.observer.on_delta(flight.request, d)


DROPPED = "the engine dropped this request; see the server log"


class EngineError(RuntimeError):
    """The engine ended a request early; `failure.kind` says whose fault (the API maps it to
    400, 500 or 503)."""

    def __init__(self, message: str, failure: RequestFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure or RequestFailure(message)
