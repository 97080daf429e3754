"""Stored chat completions (`store: true` on /v1/chat/completions): the completion object as
answered, the request's messages and the metadata, in the `chat_completions` table, per project.

OpenAI keeps them for distillation and evals; here they are what a fine-tuning file can be made
from (one project's answers, filtered by model and metadata). A completion of another project
reads as missing.

The API's handlers reach the store through `CompletionRecords`, awaited: on one node (and on a
Ray deployment's control replica) `LocalCompletions` calls this store directly; a Ray engine
replica's implementation awaits the control replica's store (genserve/ray/records.py), so a
completion stored through one replica is listed by every other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from genserve.storage.db import Database

SCAN = 256  # rows read per query while a filtered page fills


@dataclass(frozen=True, slots=True)
class StoredCompletion:
    id: str
    project: str
    created_at: int
    model: str
    body: dict  # OpenAI's chat.completion object, as answered (its `metadata` kept current)
    messages: list[dict]  # the request's messages, each with its id


@dataclass(frozen=True, slots=True)
class CompletionQuery:
    """GET /v1/chat/completions: one project's, newest last unless order is desc."""

    project: str
    model: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # every pair must match
    after: str | None = None
    limit: int = 20
    descending: bool = False


class CompletionStore:
    def __init__(self, db: Database) -> None:
        self.db = db  # the table is in storage/db.py's SCHEMA

    def put(self, c: StoredCompletion) -> None:
        self.db.execute(
            "INSERT INTO chat_completions (id, project, created_at, model, body, messages)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                c.id, c.project, c.created_at, c.model, json.dumps(c.body),
                json.dumps(c.messages),
            ),
        )  # fmt: skip

    def get(self, completion_id: str, project: str) -> StoredCompletion | None:
        rows = self.db.query(
            "SELECT * FROM chat_completions WHERE id = ? AND project = ?", (completion_id, project)
        )
        return _stored(rows[0]) if rows else None

    def list(self, q: CompletionQuery) -> tuple[list[StoredCompletion], bool]:
        """(a page, whether more follow). Metadata is matched here, on rows read SCAN rows at
        a time until the page is full: the JSON column has no index, and a project's store may
        be large."""
        seq = self._cursor(q)
        if seq is None:
            return [], False
        op, order = ("<", "DESC") if q.descending else (">", "ASC")
        model = "" if q.model is None else " AND model = ?"
        sql = (
            f"SELECT * FROM chat_completions WHERE project = ?{model} AND seq {op} ?"
            f" ORDER BY seq {order} LIMIT {SCAN}"
        )
        page: list[StoredCompletion] = []
        while True:
            args = (q.project, *(() if q.model is None else (q.model,)), seq)
            rows = self.db.query(sql, args)
            for row in rows:
                c = _stored(row)
                if all((c.body.get("metadata") or {}).get(k) == v for k, v in q.metadata):
                    if len(page) == q.limit:
                        return page, True
                    page.append(c)
            if len(rows) < SCAN:
                return page, False
            seq = rows[-1]["seq"]

    def _cursor(self, q: CompletionQuery) -> int | None:
        """The seq a page starts after; None when `after` is not one of the project's."""
        if q.after is None:
            return 2**63 - 1 if q.descending else 0
        found = self.db.query(
            "SELECT seq FROM chat_completions WHERE id = ? AND project = ?", (q.after, q.project)
        )
        return found[0]["seq"] if found else None

    def set_metadata(self, completion_id: str, project: str, metadata: dict[str, str]) -> bool:
        found = self.get(completion_id, project)
        if found is None:
            return False
        body = {**found.body, "metadata": metadata}
        sql = "UPDATE chat_completions SET body = ? WHERE id = ? AND project = ?"
        return self.db.execute(sql, (json.dumps(body), completion_id, project)) > 0

    def delete(self, completion_id: str, project: str) -> bool:
        sql = "DELETE FROM chat_completions WHERE id = ? AND project = ?"
        return self.db.execute(sql, (completion_id, project)) > 0


class CompletionRecords(Protocol):
    """Stored completions as the API's handlers use them; every call is scoped to a project
    (the query's, for a listing)."""

    async def put(self, c: StoredCompletion) -> None: ...

    async def get(self, completion_id: str, project: str) -> StoredCompletion | None: ...

    async def list(self, q: CompletionQuery) -> tuple[list[StoredCompletion], bool]: ...

    async def set_metadata(
        self, completion_id: str, project: str, metadata: dict[str, str]
    ) -> bool: ...

    async def delete(self, completion_id: str, project: str) -> bool: ...


class LocalCompletions:
    """CompletionRecords over this process's store, called on the event loop as the handlers
    always have (each call is a short SQLite read or write)."""

    def __init__(self, store: CompletionStore) -> None:
        self.store = store

    async def put(self, c: StoredCompletion) -> None:
        self.store.put(c)

    async def get(self, completion_id: str, project: str) -> StoredCompletion | None:
        return self.store.get(completion_id, project)

    async def list(self, q: CompletionQuery) -> tuple[list[StoredCompletion], bool]:
        return self.store.list(q)

    async def set_metadata(
        self, completion_id: str, project: str, metadata: dict[str, str]
    ) -> bool:
        return self.store.set_metadata(completion_id, project, metadata)

    async def delete(self, completion_id: str, project: str) -> bool:
        return self.store.delete(completion_id, project)


def _stored(row) -> StoredCompletion:  # noqa: ANN001 - a sqlite3.Row
    return StoredCompletion(
        row["id"], row["project"], row["created_at"], row["model"], json.loads(row["body"]),
        json.loads(row["messages"]),
    )  # fmt: skip
