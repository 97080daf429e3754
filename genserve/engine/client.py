"""AsyncEngine: the asyncio face of the engine thread. submit -> AsyncIterator[TokenDelta]."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from genserve.engine.core import STOPPED, AdapterOp, EngineCore
from genserve.engine.scheduler import QueueFullError
from genserve.engine.types import (
    EngineStats,
    FinishReason,
    Request,
    RequestFailure,
    TokenDelta,
)

# One API call (its prompts x best_of, or n) may hold at most this share of the engine's slots,
# so a single caller cannot take every slot (18 prompts x best_of 16 did); at least one.
GROUP_SLOT_SHARE = 0.5


class Observer(Protocol):
    """Sees every delta as it arrives (metrics); must be quick, it runs on the event loop."""

    def on_delta(self, request: Request, delta: TokenDelta) -> None: ...

    def on_abandon(self, request: Request) -> None: ...


class ContextLengthError(ValueError):
    """Prompt plus max_tokens do not fit in the model's context."""


class AsyncEngine:
    def __init__(self, core: EngineCore, max_len: int, capacity: int) -> None:
        self.core = core
        self.max_len = max_len
        self.capacity = capacity  # running slots + waiting queue: more in flight gets 429
        self._streams: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._requests: dict[str, Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.observer: Observer | None = None  # metrics, set by the API

    @property
    def max_group(self) -> int:
        """The most sequences one API call may run (see GROUP_SLOT_SHARE)."""
        return max(1, int(self.core.scheduler.slots.num_slots * GROUP_SLOT_SHARE))

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

    def _fail_open(self, error: RequestFailure) -> None:
        for rid in list(self._streams):
            request = self._requests.get(rid)
            prompt = len(request.prompt_token_ids) if request is not None else 0
            delta = TokenDelta(rid, (), "", FinishReason.ABORT, prompt, 0, error=error)
            self._dispatch([delta])

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

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

    def open(self, requests: Sequence[Request]) -> list[AsyncIterator[TokenDelta]]:
        """Admit a group (the n choices of one call) whole or not at all, then stream each.

        Synchronous on purpose: the capacity check and the registration happen in one tick of
        the event loop, so concurrent calls cannot overshoot the bound.
        """
        if self._stopped:
            raise EngineError(STOPPED.message, STOPPED)
        for r in requests:
            self.check_context(len(r.prompt_token_ids), r.params.max_tokens)
        if len(self._streams) + len(requests) > self.capacity:
            raise QueueFullError(f"the server is at capacity ({self.capacity} requests in flight)")
        streams = []
        for r in requests:
            self._streams[r.request_id] = asyncio.Queue()
            self._requests[r.request_id] = r
            self.core.submit(r)
            streams.append(self._follow(r.request_id))
        return streams

    async def _follow(self, rid: str) -> AsyncIterator[TokenDelta]:
        """One request's deltas; leaving early (client gone) aborts it in the engine."""
        stream = self._streams[rid]
        try:
            while True:
                delta = await stream.get()
                if delta.finished:
                    self._streams.pop(rid, None)
                if delta.finish_reason is FinishReason.ABORT:
                    failure = delta.error or RequestFailure(DROPPED)
                    raise EngineError(failure.message, failure)
                yield delta
                if delta.finished:
                    return
        finally:
            self.release(rid)

    def release(self, rid: str) -> None:
        """Forget a request and abort it in the engine, unless it already finished. Idempotent."""
        request = self._requests.pop(rid, None)
        if self._streams.pop(rid, None) is not None:
            self.core.abort(rid)
            if self.observer is not None and request is not None:
                self.observer.on_abandon(request)

    # -- called on the engine thread ---------------------------------------------------------
    def _publish(self, deltas: Sequence[TokenDelta]) -> None:
        # One hop to the event loop per step, not per token.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _dispatch(self, deltas: Sequence[TokenDelta]) -> None:
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None:
                continue
            stream.put_nowait(d)
            request = self._requests.get(d.request_id)
            if self.observer is not None and request is not None:
                self.observer.on_delta(request, d)
            if d.finished:
                self._requests.pop(d.request_id, None)


DROPPED = "the engine dropped this request; see the server log"


class EngineError(RuntimeError):
    """The engine ended a request early; `failure.kind` says whose fault (the API maps it to
    400, 500 or 503)."""

    def __init__(self, message: str, failure: RequestFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure or RequestFailure(message)
