"""Conversations (OpenAI's Conversations API): each conversation's metadata in `conversations`,
its items in `conversation_items` in the order they came, per project.

Items are kept as the Responses API keeps them (checked input items, a response's output
items): a response run in a conversation reads them all as its context and, once it has ended,
appends its input and output in one transaction. An item's id is unique within its
conversation, so that it can be read and deleted by id: the routes refuse a duplicate with a
400 as OpenAI does, and one that collides at append time anyway (two responses of one
conversation ending with the same client-chosen id) is given a new id rather than lose the
turn. A conversation of another project reads as missing.

The API's handlers reach the store through `ConversationRecords`, awaited: on one node (and on
a Ray deployment's control replica) `LocalConversations` calls this store directly; a Ray engine
replica's implementation awaits the control replica's store (genserve/ray/records.py), so a
conversation's items are the same whichever replica a response in it runs on.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from genserve.storage.db import Database


@dataclass(frozen=True, slots=True)
class StoredConversation:
    id: str
    project: str
    created_at: int
    metadata: dict[str, str]

    def body(self) -> dict:
        """OpenAI's Conversation object."""
        return {
            "id": self.id, "object": "conversation", "created_at": self.created_at,
            "metadata": self.metadata,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ItemPage:
    items: list[dict]
    has_more: bool


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.db = db  # the tables are in storage/db.py's SCHEMA

    def create(self, c: StoredConversation, items: Sequence[dict]) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO conversations (id, project, created_at, metadata) VALUES (?, ?, ?, ?)",
                (c.id, c.project, c.created_at, json.dumps(c.metadata)),
            )
            _insert_items(cur, c.id, items)

    def get(self, conversation_id: str, project: str) -> StoredConversation | None:
        rows = self.db.query(
            "SELECT * FROM conversations WHERE id = ? AND project = ?", (conversation_id, project)
        )
        if not rows:
            return None
        row = rows[0]
        metadata = json.loads(row["metadata"])
        return StoredConversation(row["id"], row["project"], row["created_at"], metadata)

    def set_metadata(self, conversation_id: str, project: str, metadata: dict[str, str]) -> bool:
        sql = "UPDATE conversations SET metadata = ? WHERE id = ? AND project = ?"
        return self.db.execute(sql, (json.dumps(metadata), conversation_id, project)) > 0

    def delete(self, conversation_id: str, project: str) -> bool:
        """The conversation and its items (the responses run in it stay)."""
        with self.db.transaction() as cur:
            sql = "DELETE FROM conversations WHERE id = ? AND project = ?"
            gone = cur.execute(sql, (conversation_id, project)).rowcount > 0
            if gone:
                sql = "DELETE FROM conversation_items WHERE conversation_id = ?"
                cur.execute(sql, (conversation_id,))
        return gone

    def append(self, conversation_id: str, project: str, items: Sequence[dict]) -> bool:
        """Items added after the last one; False (nothing added) when the conversation is gone
        (deleted while a response in it ran)."""
        with self.db.transaction() as cur:
            sql = "SELECT 1 FROM conversations WHERE id = ? AND project = ?"
            if cur.execute(sql, (conversation_id, project)).fetchone() is None:
                return False
            _insert_items(cur, conversation_id, items)
        return True

    def items(self, conversation_id: str) -> list[dict]:
        """Every item, oldest first: the context a response in this conversation sees."""
        rows = self.db.query(
            "SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY seq",
            (conversation_id,),
        )
        return [json.loads(row["item"]) for row in rows]

    def taken(self, conversation_id: str, ids: Sequence[str]) -> list[str]:
        """Those of `ids` that items of this conversation already have."""
        rows = self.db.query(
            "SELECT id FROM conversation_items WHERE conversation_id = ?"
            " AND id IN (SELECT value FROM json_each(?))",
            (conversation_id, json.dumps(list(ids))),
        )
        return [row["id"] for row in rows]

    def page(
        self, conversation_id: str, after: str | None, limit: int, descending: bool
    ) -> ItemPage | None:
        """A page of items in either order, after the item `after`; None when it has none
        by that id."""
        seq = self._cursor(conversation_id, after, descending)
        if seq is None:
            return None
        op, order = ("<", "DESC") if descending else (">", "ASC")
        rows = self.db.query(
            f"SELECT item FROM conversation_items WHERE conversation_id = ? AND seq {op} ?"
            f" ORDER BY seq {order} LIMIT ?",
            (conversation_id, seq, limit + 1),
        )
        items = [json.loads(row["item"]) for row in rows]
        return ItemPage(items[:limit], len(items) > limit)

    def _cursor(self, conversation_id: str, after: str | None, descending: bool) -> int | None:
        if after is None:
            return 2**63 - 1 if descending else 0
        found = self.db.query(
            "SELECT seq FROM conversation_items WHERE conversation_id = ? AND id = ?",
            (conversation_id, after),
        )
        return found[0]["seq"] if found else None

    def item(self, conversation_id: str, item_id: str) -> dict | None:
        rows = self.db.query(
            "SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?",
            (conversation_id, item_id),
        )
        return json.loads(rows[0]["item"]) if rows else None

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        sql = "DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?"
        return self.db.execute(sql, (conversation_id, item_id)) > 0


class ConversationRecords(Protocol):
    """Conversations as the API's handlers use them. Every call names the caller's project: a
    conversation of another project reads as missing and its items as none, wherever the store
    is."""

    async def create(self, c: StoredConversation, items: Sequence[dict]) -> None: ...

    async def get(self, conversation_id: str, project: str) -> StoredConversation | None: ...

    async def set_metadata(
        self, conversation_id: str, project: str, metadata: dict[str, str]
    ) -> bool: ...

    async def delete(self, conversation_id: str, project: str) -> bool: ...

    async def append(self, conversation_id: str, project: str, items: Sequence[dict]) -> bool: ...

    async def items(self, conversation_id: str, project: str) -> list[dict]: ...

    async def taken(self, conversation_id: str, project: str, ids: Sequence[str]) -> list[str]: ...

    async def page(
        self, conversation_id: str, project: str, after: str | None, limit: int, descending: bool
    ) -> ItemPage | None: ...

    async def item(self, conversation_id: str, project: str, item_id: str) -> dict | None: ...

    async def delete_item(self, conversation_id: str, project: str, item_id: str) -> bool: ...


class LocalConversations:
    """ConversationRecords over this process's store, called on the event loop as the handlers
    always have. The handlers read a conversation of their project before they read or change
    its items: those calls need no check here."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    async def create(self, c: StoredConversation, items: Sequence[dict]) -> None:
        self.store.create(c, items)

    async def get(self, conversation_id: str, project: str) -> StoredConversation | None:
        return self.store.get(conversation_id, project)

    async def set_metadata(
        self, conversation_id: str, project: str, metadata: dict[str, str]
    ) -> bool:
        return self.store.set_metadata(conversation_id, project, metadata)

    async def delete(self, conversation_id: str, project: str) -> bool:
        return self.store.delete(conversation_id, project)

    async def append(self, conversation_id: str, project: str, items: Sequence[dict]) -> bool:
        return self.store.append(conversation_id, project, items)

    async def items(self, conversation_id: str, project: str) -> list[dict]:
        return self.store.items(conversation_id)

    async def taken(self, conversation_id: str, project: str, ids: Sequence[str]) -> list[str]:
        return self.store.taken(conversation_id, ids)

    async def page(
        self, conversation_id: str, project: str, after: str | None, limit: int, descending: bool
    ) -> ItemPage | None:
        return self.store.page(conversation_id, after, limit, descending)

    async def item(self, conversation_id: str, project: str, item_id: str) -> dict | None:
        return self.store.item(conversation_id, item_id)

    async def delete_item(self, conversation_id: str, project: str, item_id: str) -> bool:
        return self.store.delete_item(conversation_id, item_id)


def _insert_items(cur, conversation_id: str, items: Sequence[dict]) -> None:  # noqa: ANN001
    sql = (
        "INSERT INTO conversation_items (conversation_id, id, item) VALUES (?, ?, ?)"
        " ON CONFLICT (conversation_id, id) DO NOTHING"
    )
    for item in items:
        if cur.execute(sql, (conversation_id, item["id"], json.dumps(item))).rowcount == 0:
            item = {**item, "id": _fresh_id(item["id"])}
            cur.execute(sql, (conversation_id, item["id"], json.dumps(item)))


def _fresh_id(taken: str) -> str:
    """A new id of the same kind (`msg_...`, `fc_...`) for an item whose id is taken."""
    prefix = taken.partition("_")[0] if "_" in taken else "item"
    return f"{prefix}_{secrets.token_hex(24)}"
