"""The model registry's records: what to load at start, and each model's serving settings."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from genserve.storage.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
  id TEXT PRIMARY KEY,
  ref TEXT NOT NULL,
  kind TEXT NOT NULL,
  settings TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  from_cli INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    id: str
    ref: str
    kind: str  # "generate" | "embed"
    settings: dict  # ModelSettings.as_dict()
    created_at: int
    from_cli: bool = False  # loaded by the command line: restored by it, not by the registry


class ModelStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        with db.transaction() as cur:
            cur.execute(SCHEMA)

    def all(self) -> list[ModelRecord]:
        rows = self.db.query("SELECT * FROM models ORDER BY created_at, id")
        return [_record(r) for r in rows]

    def get(self, model_id: str) -> ModelRecord | None:
        rows = self.db.query("SELECT * FROM models WHERE id = ?", (model_id,))
        return _record(rows[0]) if rows else None

    def put(self, model_id: str, ref: str, kind: str, settings: dict, from_cli: bool) -> None:
        self.db.execute(
            "INSERT INTO models (id, ref, kind, settings, created_at, from_cli) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET ref = excluded.ref, "
            "kind = excluded.kind, settings = excluded.settings, from_cli = excluded.from_cli",
            (model_id, ref, kind, json.dumps(settings), int(time.time()), int(from_cli)),
        )

    def set_settings(self, model_id: str, settings: dict) -> None:
        self.db.execute(
            "UPDATE models SET settings = ? WHERE id = ?", (json.dumps(settings), model_id)
        )

    def delete(self, model_id: str) -> None:
        self.db.execute("DELETE FROM models WHERE id = ?", (model_id,))


def _record(row) -> ModelRecord:  # noqa: ANN001 - sqlite3.Row
    return ModelRecord(
        row["id"],
        row["ref"],
        row["kind"],
        json.loads(row["settings"]),
        row["created_at"],
        bool(row["from_cli"]),
    )
