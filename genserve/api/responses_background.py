"""Background responses (`background: true`): generation that runs on in the server, apart from
the HTTP request that started it.

A run is a task on the event loop. It turns the generation's deltas into the same typed events
a stream sends (api/responses_events.py), keeps them all in memory while it runs (for the
clients following it, from any sequence number), and writes them to the store in batches
(storage/responses.py: EVENTS_FLUSH_EVERY), with the response's state as it changes: `queued`
once admitted, `in_progress` from its first token, then `completed`, `incomplete`, `failed`
(with its `error`) or `cancelled`. Once it has ended, its events are read from the store:
they stay as long as the response does (DELETE removes both).

Cancelling a run (POST .../cancel, DELETE, the server's shutdown) cancels its task: leaving
the generation's events aborts the engine's requests, as a client leaving a stream does.

Under Ray a run lives on the engine replica that started it, and its store is the control
replica's: `ForwardedWrites` sends its writes there in order from a task of its own (the run
never waits on a round trip), and reads every CANCEL_CHECK_S whether a cancel was asked
through another replica (storage/responses.py `request_cancel`). Another replica answers a GET
from the stored state, and a stream by polling the stored events (api/responses.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from genserve.api.middleware import EdgeState
from genserve.api.responses_events import (
    StreamState,
    advance,
    close_all,
    close_call,
    close_text,
)
from genserve.api.responses_wire import response_object, usage
from genserve.runtime.errors import DomainError, InvalidRequest, Overloaded
from genserve.runtime.generation import ChoiceDelta, Event
from genserve.storage.responses import EVENTS_FLUSH_EVERY, ResponseRecords, StoredEvent
from genserve.storage.usage import Used

log = logging.getLogger(__name__)
Frame = dict  # one SSE event: {"event": its type, "data": its JSON}
CANCELLED = "cancelled"  # Run.stop for a cancel; any other value is the failure's message
SHUTDOWN = "the server shut down before this response finished; create it again"
INTERNAL = "the server had an error while generating this response"
CANCEL_CHECK_S = 1.0  # how soon a run under Ray sees a cancel asked through another replica
Write = Callable[[], Awaitable[object]]


class RunStore(Protocol):
    """Where a run writes as it goes, synchronously: this process's ResponseStore, or under
    Ray a ForwardedWrites."""

    def add_events(self, response_id: str, events: Sequence[StoredEvent]) -> None: ...

    def update(
        self,
        response_id: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> None: ...


@dataclass(slots=True)
class Run:
    """One background response while it runs. `events[i]` is the event numbered i."""

    st: StreamState
    store: RunStore
    prompt_tokens: int
    context: list[dict]  # the chain's items and this input: its output joins them at the end
    on_end: Callable[[Used], None]  # called once, with the tokens it cost
    # Called with its output once it has completed or is incomplete (not when it failed or
    # was cancelled): its conversation's turn.
    on_output: Callable[[list[dict]], None] | None = None
    # Awaited once it has ended, before it stops counting as in flight: its writes all sent
    # (under Ray, ForwardedWrites.settle).
    settle: Callable[[], Awaitable[None]] | None = None
    status: str = "queued"
    events: list[Frame] = field(default_factory=list)
    flushed: int = 0  # events[:flushed] are in the store
    done: bool = False
    stop: str | None = None  # why it was stopped: CANCELLED, or a failure's message
    task: asyncio.Task | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its task has begun
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.st.env.id

    def snapshot(self) -> dict:
        """The Response object as it stands: what polling it answers."""
        return response_object(self.st.env, self.status, list(self.st.output))

    def begin(self) -> list[StoredEvent]:
        """Its first events (response.created, response.queued), to store with its row."""
        obj = self.snapshot()
        self.publish(
            [
                self.st.event("response.created", response=obj),
                self.st.event("response.queued", response=obj),
            ]
        )
        return self.unflushed()

    def publish(self, frames: Sequence[Frame]) -> None:
        self.events += frames
        if len(self.events) - self.flushed >= EVENTS_FLUSH_EVERY:
            # Before any follower reads the last of them (they run after this returns).
            self.store.add_events(self.id, self.unflushed())
        self.wake.set()
        self.wake = asyncio.Event()

    def unflushed(self) -> list[StoredEvent]:
        start, self.flushed = self.flushed, len(self.events)
        frames = self.events[start:]
        return [StoredEvent(start + i, f["event"], f["data"]) for i, f in enumerate(frames)]

    def take(self, d: ChoiceDelta) -> None:
        """One generation step; the first one means the engine has started on it."""
        if self.status == "queued":
            self.status = "in_progress"
            self.publish([self.st.event("response.in_progress", response=self.snapshot())])
            self.store.update(self.id, self.snapshot(), events=self.unflushed())
        self.publish(advance(self.st, d))

    async def consume(self, events: AsyncIterator[Event]) -> None:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for d in events:
                assert isinstance(d, ChoiceDelta)
                self.take(d)

    def end(self, status: str, error: dict | None = None) -> None:
        """Its last state, stored with the events not stored yet. A cancelled one sends no
        more events (OpenAI's stream has none for it): its output closes where it stopped."""
        try:
            if status in ("completed", "incomplete"):
                frames = close_all(self.st, self.st.status)
            else:  # cut short: its open item is incomplete, and no output is none
                frames = close_text(self.st, "incomplete") + close_call(self.st)
            st = self.st
            use = usage(
                self.prompt_tokens, st.completion_tokens, st.cached_tokens, st.reasoning_tokens
            )
            obj = response_object(self.st.env, status, self.st.output, use, error)
            if status != CANCELLED:
                self.publish([*frames, self.st.event(f"response.{status}", response=obj)])
            self.status = status
            context = self.context + obj["output"]
            self.store.update(self.id, obj, context, self.unflushed())
            if status in ("completed", "incomplete") and self.on_output is not None:
                self.on_output(obj["output"])
        except Exception:  # noqa: BLE001 - the store failed: followers must still be let go
            log.exception("background response %s: storing its end failed", self.id)
        finally:
            self.done = True
            self.wake.set()
            st = self.st
            self.on_end(Used("completions", st.env.model, self.prompt_tokens,
                             st.completion_tokens, st.cached_tokens))  # fmt: skip


async def follow(run: Run, after: int) -> AsyncIterator[Frame]:
    """A running response's events numbered after `after`, then each as it comes, to its end."""
    i = max(after + 1, 0)
    while True:
        wake = run.wake  # taken before reading: an event published meanwhile sets this one
        while i < len(run.events):
            yield run.events[i]
            i += 1
        if run.done:
            return
        await wake.wait()


def replay(events: Sequence[StoredEvent]) -> list[Frame]:
    """An ended response's stored events, as frames."""
    return [{"event": e.type, "data": e.data} for e in events]


def failure(e: DomainError) -> dict:
    """A Response's `error` (OpenAI's ResponseError codes) for what ended its generation."""
    if isinstance(e, InvalidRequest):
        return {"code": "invalid_prompt", "message": e.message}
    if isinstance(e, Overloaded):
        return {"code": "rate_limit_exceeded", "message": e.message}
    return {"code": "server_error", "message": e.message}


class BackgroundResponses:
    """The runs of this process, by response id, while they run.

    Each counts as a request in flight (EdgeState.in_flight) until it ends: SIGTERM's drain
    (genserve/server.py) waits for it as for a stream, and past --drain-timeout the engine's
    cut fails it. A user who asked for it expects it finished, and rerunning it after the
    restart would contradict the events a client has already read."""

    def __init__(self, edge: EdgeState) -> None:
        self.edge = edge
        self.runs: dict[str, Run] = {}

    def start(self, run: Run, events: AsyncIterator[Event]) -> None:
        self.runs[run.id] = run
        self.edge.in_flight += 1
        run.task = asyncio.create_task(self._drive(run, events), name=f"background {run.id}")

    def live(self, response_id: str) -> Run | None:
        return self.runs.get(response_id)

    async def cancel_id(self, response_id: str) -> None:
        run = self.live(response_id)
        if run is not None:
            await self.cancel(run)

    async def cancel(self, run: Run, why: str = CANCELLED) -> None:
        """Stop a run and wait for its end to be stored (a second call waits the same)."""
        run.stop = run.stop or why
        assert run.task is not None
        # A task cancelled before its first step never runs, and would never end the run
        # (nor close its events, which aborts the engine's requests): let it begin first.
        await run.started.wait()
        run.task.cancel()
        await asyncio.wait({run.task})

    async def stop(self) -> None:
        """At shutdown: whatever still runs (past the drain) fails, saying so."""
        for run in list(self.runs.values()):
            await self.cancel(run, SHUTDOWN)

    async def _drive(self, run: Run, events: AsyncIterator[Event]) -> None:
        run.started.set()
        try:
            await run.consume(events)
        except asyncio.CancelledError:
            if run.stop is None:  # not ours (the loop is closing): end it as a shutdown
                run.stop = SHUTDOWN
            else:  # ours, and handled here: the task itself ends normally
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            end_stopped(run)
        except DomainError as e:
            log.error("background response %s failed: %s", run.id, e)
            run.end("failed", failure(e))
        except Exception:  # noqa: BLE001 - a bug here must not leave it in progress
            log.exception("background response %s failed", run.id)
            run.end("failed", {"code": "server_error", "message": INTERNAL})
        else:
            run.end(run.st.status)
        finally:
            await self._settle(run)

    async def _settle(self, run: Run) -> None:
        try:
            if run.settle is not None:  # shielded: a second cancel must not lose its end
                await asyncio.shield(run.settle())
        finally:
            self.runs.pop(run.id, None)
            self.edge.in_flight -= 1


def end_stopped(run: Run) -> None:
    if run.stop == CANCELLED:
        run.end(CANCELLED)
    else:
        run.end("failed", {"code": "server_error", "message": run.stop or SHUTDOWN})


class ForwardedWrites:
    """A background run's writes under Ray (a RunStore): the run makes them synchronously, as
    to its own store; they reach the control replica's store in order, one at a time, from a
    task of their own. Each write answers whether a replica that does not run it asked to
    cancel it, and the same task asks too when CANCEL_CHECK_S pass without one (a queued or a
    slow run); it is then cancelled here (`on_cancel`)."""

    def __init__(
        self, records: ResponseRecords, project: str, response_id: str, on_cancel: Write
    ) -> None:
        self.records, self.project, self.response_id = records, project, response_id
        self.on_cancel = on_cancel
        self.queue: asyncio.Queue[Write | None] = asyncio.Queue()
        self.check_at = time.monotonic() + CANCEL_CHECK_S
        self.cancelling: asyncio.Task | None = None
        self.task = asyncio.create_task(self._send_all(), name=f"writes of {response_id}")

    def add_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        events = list(events)
        self.later(lambda: self._check(self.records.add_events(response_id, self.project, events)))

    def update(
        self,
        response_id: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> None:
        events = list(events)
        self.later(
            lambda: self._check(
                self.records.update(response_id, self.project, body, context, events)
            )
        )

    def later(self, write: Write) -> None:
        """A write sent after those before it (its conversation's turn, too)."""
        self.queue.put_nowait(write)

    async def settle(self) -> None:
        """Once the run has ended: every write sent (or failed, with a warning)."""
        self.queue.put_nowait(None)
        await self.task

    async def _send_all(self) -> None:
        while True:
            try:
                wait = max(self.check_at - time.monotonic(), 0.0)
                write = await asyncio.wait_for(self.queue.get(), wait)
            except TimeoutError:
                write = self._check_cancel
            if write is None:
                return
            try:
                await write()
            except Exception as e:  # noqa: BLE001 - the run goes on; this write is lost
                log.warning("background response %s: a write failed: %s", self.response_id, e)

    async def _check_cancel(self) -> None:
        await self._check(self.records.cancel_requested(self.response_id, self.project))

    async def _check(self, asked: Awaitable[bool]) -> None:
        """A write or a question, answered with whether a cancel was asked."""
        self.check_at = time.monotonic() + CANCEL_CHECK_S
        if await asked and self.cancelling is None:
            # Not awaited: the cancel waits for the run's end, whose writes wait for this task.
            self.cancelling = asyncio.create_task(self.on_cancel())
