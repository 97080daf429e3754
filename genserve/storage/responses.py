"""Stored Responses (`store: true`): the response object, its input items, and the context a
`previous_response_id` continues from, in the `responses` table, per project.

The context is the whole conversation up to and including this response's output (the chain's
earlier inputs and outputs, then this one's), kept with the row so that continuing a chain is
one read however long it is. A response of another project reads as missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from genserve.storage.db import Database


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    project: str
    created_at: int
    body: dict  # OpenAI's Response object, as answered
    input_items: list[dict]  # this request's input, each with its id
    context: list[dict]  # every item a continuation sees, this response's output last


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db  # the table is in storage/db.py's SCHEMA

    def put(self, r: StoredResponse) -> None:
        self.db.execute(
            "INSERT INTO responses (id, project, created_at, body, input_items, context)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                r.id, r.project, r.created_at, json.dumps(r.body),
                json.dumps(r.input_items), json.dumps(r.context),
            ),
        )  # fmt: skip

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
        sql = "DELETE FROM responses WHERE id = ? AND project = ?"
        return self.db.execute(sql, (response_id, project)) > 0
