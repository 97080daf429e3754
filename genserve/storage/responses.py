"""Stored Responses (`store: true`): the response object, its input items, and the context a
`previous_response_id` continues from, in the `responses` table, per project; a background
response's stream events in `response_events`.

The context is the whole conversation up to and including this response's output (the chain's
earlier inputs and outputs, then this one's), kept with the row so that continuing a chain is
one read however long it is. A response of another project reads as missing.

A background response is written when it is created (status `queued`) and again as it changes;
its events are written in batches while it runs (EVENTS_FLUSH_EVERY) and the rest with its end.
A server that stops without finishing one (a crash, a kill) leaves it `queued`/`in_progress`:
`fail_unfinished` marks it failed at the next start. Under Ray a background response runs on
the engine replica that started it; a cancel landing on another replica is recorded
(`request_cancel`) for the running one to read (`cancel_requested`) and act on.

The API's handlers reach the store through `ResponseRecords`, awaited: on one node (and on a
Ray deployment's control replica) `LocalResponses` calls this store directly, as before; a Ray
engine replica's implementation awaits the control replica's store instead
(genserve/ray/records.py), so a response stored by one replica is found by every other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from genserve.storage.db import Database

RUNNING = ("queued", "in_progress")
# A running response's events reach the table in batches of this many: fewer writes (each one
# is an fsync) for a window of events a crash loses. Its runner writes a batch before any
# client can read its last event, so a client has seen at most this many events past the last
# one written; the `response.failed` event a restart adds takes a sequence number past them.
EVENTS_FLUSH_EVERY = 32


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    project: str
    created_at: int
    body: dict  # OpenAI's Response object, as answered
    input_items: list[dict]  # this request's input, each with its id
    context: list[dict]  # every item a continuation sees, this response's output last

    @property
    def background(self) -> bool:
        return self.body.get("background") is True

    @property
    def status(self) -> str:
        return self.body.get("status", "completed")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One stream event of a background response: its SSE event name and its JSON."""

    seq: int
    type: str
    data: str


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db  # the tables are in storage/db.py's SCHEMA

    def put(self, r: StoredResponse, events: Sequence[StoredEvent] = ()) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO responses (id, project, created_at, body, input_items, context,"
                " status, background) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id, r.project, r.created_at, json.dumps(r.body),
                    json.dumps(r.input_items), json.dumps(r.context), r.status, r.background,
                ),
            )  # fmt: skip
            _insert_events(cur, r.id, events)

    def update(
        self,
        response_id: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> None:
        """A background response's new state (and, once it has ended, its context), with the
        events not written yet, in one transaction."""
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE responses SET body = ?, status = ? WHERE id = ?",
                (json.dumps(body), body["status"], response_id),
            )
            if context is not None:
                sql = "UPDATE responses SET context = ? WHERE id = ?"
                cur.execute(sql, (json.dumps(context), response_id))
            _insert_events(cur, response_id, events)

    def add_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        with self.db.transaction() as cur:
            _insert_events(cur, response_id, events)

    def events_after(self, response_id: str, seq: int) -> list[StoredEvent]:
        rows = self.db.query(
            "SELECT seq, type, data FROM response_events WHERE response_id = ? AND seq > ?"
            " ORDER BY seq",
            (response_id, seq),
        )
        return [StoredEvent(row["seq"], row["type"], row["data"]) for row in rows]

    def get(self, response_id: str, project: str) -> StoredResponse | None:
        rows = self.db.query(
            "SELECT * FROM responses WHERE id = ? AND project = ?", (response_id, project)
        )
        if not rows:
            return None
        row = rows[0]
        return StoredResponse(
            row["id"], row["project"], row["created_at"], json.loads(row["body"]),
            json.loads(row["input_items"]), json.loads(row["context"]),
        )  # fmt: skip

    def delete(self, response_id: str, project: str) -> bool:
        with self.db.transaction() as cur:
            sql = "DELETE FROM responses WHERE id = ? AND project = ?"
            gone = cur.execute(sql, (response_id, project)).rowcount > 0
            if gone:
                cur.execute("DELETE FROM response_events WHERE response_id = ?", (response_id,))
                cur.execute("DELETE FROM response_cancels WHERE response_id = ?", (response_id,))
        return gone

    def request_cancel(self, response_id: str) -> None:
        sql = "INSERT INTO response_cancels (response_id) VALUES (?) ON CONFLICT DO NOTHING"
        self.db.execute(sql, (response_id,))

    def cancel_requested(self, response_id: str) -> bool:
        sql = "SELECT 1 FROM response_cancels WHERE response_id = ?"
        return bool(self.db.query(sql, (response_id,)))

    def fail_unfinished(self, message: str) -> list[str]:
        """Mark every response still queued or in progress failed (nothing runs them any
        more: call it at start-up, before any is created), ending its events with
        `response.failed`; their ids."""
        with self.db.transaction() as cur:
            rows = cur.execute(
                "SELECT id, body FROM responses WHERE status IN (?, ?)", RUNNING
            ).fetchall()
            for row in rows:
                body = json.loads(row["body"])
                body |= {"status": "failed", "error": {"code": "server_error", "message": message}}
                last = cur.execute(
                    "SELECT MAX(seq) FROM response_events WHERE response_id = ?", (row["id"],)
                ).fetchone()[0]
                seq = (-1 if last is None else last) + EVENTS_FLUSH_EVERY
                data = {"type": "response.failed", "response": body, "sequence_number": seq}
                sql = "UPDATE responses SET body = ?, status = 'failed' WHERE id = ?"
                cur.execute(sql, (json.dumps(body), row["id"]))
                event = StoredEvent(seq, "response.failed", json.dumps(data))
                _insert_events(cur, row["id"], [event])
        return [row["id"] for row in rows]


class ResponseRecords(Protocol):
    """Stored responses as the API's handlers use them. Every call names the caller's project:
    a response of another project reads as missing, wherever the store is. `update` and
    `add_events` answer whether a cancel of the response was asked through another replica
    (under Ray: a running background response learns it as it writes; on one node, never)."""

    async def get(self, response_id: str, project: str) -> StoredResponse | None: ...

    async def put(self, r: StoredResponse, events: Sequence[StoredEvent] = ()) -> None: ...

    async def update(
        self,
        response_id: str,
        project: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> bool: ...

    async def add_events(
        self, response_id: str, project: str, events: Sequence[StoredEvent]
    ) -> bool: ...

    async def delete(self, response_id: str, project: str) -> bool: ...

    async def events_after(self, response_id: str, project: str, seq: int) -> list[StoredEvent]: ...

    async def request_cancel(self, response_id: str, project: str) -> None: ...

    async def cancel_requested(self, response_id: str, project: str) -> bool: ...


class LocalResponses:
    """ResponseRecords over this process's store, called on the event loop as the handlers
    always have (each call is one short SQLite transaction). The handlers read a response of
    their project before they update it or read its events: those two need no check here."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    async def get(self, response_id: str, project: str) -> StoredResponse | None:
        return self.store.get(response_id, project)

    async def put(self, r: StoredResponse, events: Sequence[StoredEvent] = ()) -> None:
        self.store.put(r, events)

    async def update(
        self,
        response_id: str,
        project: str,
        body: dict,
        context: list[dict] | None = None,
        events: Sequence[StoredEvent] = (),
    ) -> bool:
        self.store.update(response_id, body, context, events)
        return False  # a cancel here reaches the run directly

    async def add_events(
        self, response_id: str, project: str, events: Sequence[StoredEvent]
    ) -> bool:
        self.store.add_events(response_id, events)
        return False

    async def delete(self, response_id: str, project: str) -> bool:
        return self.store.delete(response_id, project)

    async def events_after(self, response_id: str, project: str, seq: int) -> list[StoredEvent]:
        return self.store.events_after(response_id, seq)

    async def request_cancel(self, response_id: str, project: str) -> None:
        self.store.request_cancel(response_id)

    async def cancel_requested(self, response_id: str, project: str) -> bool:
        return self.store.cancel_requested(response_id)


def _insert_events(cur, response_id: str, events: Sequence[StoredEvent]) -> None:  # noqa: ANN001
    cur.executemany(
        "INSERT INTO response_events (response_id, seq, type, data) VALUES (?, ?, ?, ?)",
        [(response_id, e.seq, e.type, e.data) for e in events],
    )
