"""Stored Responses under Ray: kept in the control replica's store, whichever engine replica
answers. Each engine replica runs the whole app with a scratch store of its own; a response
stored there would be found by one replica in N. So an engine replica's handlers use
`RemoteResponses` (genserve.storage.responses.ResponseRecords), which awaits the control
replica's `response_call` through its Serve handle: the replica's event loop never blocks on
the round trip.

The control replica answers a call with `answer` (a whitelist of operations, each scoped to the
caller's project as on one node: a response of another project reads as missing, and cannot
be written, updated or deleted). Background responses are not stored this way: under Ray the
edge refuses them (their run, its cancel and its live events belong to one replica).

No Ray import here: the control replica's handle is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from genserve.runtime.errors import Unavailable
from genserve.storage.responses import ResponseStore, StoredEvent, StoredResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResponseCall:
    """One operation on the control replica's stored responses, as an engine replica asks."""

    op: str  # one of OPS
    project: str  # the caller's, as the engine replica authenticated it
    response_id: str = ""
    row: StoredResponse | None = None  # put
    events: tuple[StoredEvent, ...] = ()  # put
    body: dict | None = None  # update
    after: int = -1  # events_after


def _get(store: ResponseStore, call: ResponseCall) -> StoredResponse | None:
    return store.get(call.response_id, call.project)


def _put(store: ResponseStore, call: ResponseCall) -> None:
    if call.row is None or call.row.project != call.project:
        raise ValueError("a stored response is put under its caller's project only")
    store.put(call.row, call.events)


def _update(store: ResponseStore, call: ResponseCall) -> bool:
    if call.body is None or not isinstance(call.body.get("status"), str):
        raise ValueError("an update carries the response's body, with its status")
    if store.get(call.response_id, call.project) is None:  # another project's: untouched
        return False
    store.update(call.response_id, call.body)
    return True


def _delete(store: ResponseStore, call: ResponseCall) -> bool:
    return store.delete(call.response_id, call.project)


def _events_after(store: ResponseStore, call: ResponseCall) -> list[StoredEvent]:
    if store.get(call.response_id, call.project) is None:
        return []
    return store.events_after(call.response_id, call.after)


OPS = {
    "get": _get,
    "put": _put,
    "update": _update,
    "delete": _delete,
    "events_after": _events_after,
}


def answer(store: ResponseStore, call: ResponseCall) -> Any:  # noqa: ANN401 - per operation
    """On the control replica: one whitelisted operation, scoped to the call's project."""
    if not isinstance(call, ResponseCall):
        raise TypeError(f"not a ResponseCall: {type(call).__name__}")
    op = OPS.get(call.op)
    if op is None:
        raise ValueError(f"unknown stored-response operation {call.op!r}")
    return op(store, call)


class RemoteResponses:
    """An engine replica's ResponseRecords: the control replica's store, awaited."""

    def __init__(self, control: Any) -> None:  # noqa: ANN401 - a Serve deployment handle
        self.control = control

    async def _call(self, call: ResponseCall) -> Any:  # noqa: ANN401 - per operation
        try:
            return await self.control.response_call.remote(call)
        except Exception as e:
            # The control replica restarting, or its store failing: retrying may succeed.
            log.warning("stored responses: %s on the control replica failed: %s", call.op, e)
            raise Unavailable("response storage is unavailable: the control replica did not "
                              "answer; retry") from e  # fmt: skip

    async def get(self, response_id: str, project: str) -> StoredResponse | None:
        return await self._call(ResponseCall("get", project, response_id))

    async def put(self, r: StoredResponse, events: Sequence[StoredEvent] = ()) -> None:
        await self._call(ResponseCall("put", r.project, r.id, row=r, events=tuple(events)))

    async def update(self, response_id: str, project: str, body: dict) -> None:
        await self._call(ResponseCall("update", project, response_id, body=body))

    async def delete(self, response_id: str, project: str) -> bool:
        return await self._call(ResponseCall("delete", project, response_id))

    async def events_after(self, response_id: str, project: str, seq: int) -> list[StoredEvent]:
        return await self._call(ResponseCall("events_after", project, response_id, after=seq))
