"""Batches and their results: the `batches` and `batch_results` tables.

A result row is committed as soon as its request finishes; its primary key (batch, custom_id)
keeps a custom_id to one result whatever crashes and resumptions happen, and the output and
error files are written from these rows, in input order, when the batch ends.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from genserve.storage.db import Database
from genserve.storage.jobs import Page

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
STATUSES = (*ACTIVE, *TERMINAL)
# The timestamp column each status sets when a batch enters it.
STAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
TIMES = ("created_at", "expires_at", *STAMPS.values())


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"  # OpenAI's batch ids use "_"


@dataclass(frozen=True, slots=True)
class LineError:
    """One entry of a failed batch's `errors.data`: what is wrong, and on which line."""

    code: str
    message: str
    line: int | None = None  # 1-based line of the input file
    param: str | None = None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    project: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    status: str = "validating"
    metadata: dict[str, str] | None = None
    model: str | None = None
    total: int = 0
    errors: tuple[LineError, ...] = ()
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, ... as they happen
    output_expires_s: int | None = None  # the output and error files expire this long after


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One finished request: its output line (ok) or error line, as JSON text."""

    custom_id: str
    line: int
    ok: bool
    result: str
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int


def _batch(row) -> BatchRecord:
    errors = tuple(LineError(**e) for e in json.loads(row["errors"] or "[]"))
    return BatchRecord(
        id=row["id"],
        project=row["project"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        status=row["status"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        model=row["model"],
        total=row["total"],
        errors=errors,
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        output_expires_s=row["output_expires_s"],
        times={k: row[k] for k in STAMPS.values() if row[k] is not None},
    )


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, batch: BatchRecord) -> BatchRecord:
        self.db.execute(
            "INSERT INTO batches (id, project, endpoint, input_file_id, completion_window,"
            " metadata, status, created_at, expires_at, output_expires_s)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                batch.id, batch.project, batch.endpoint, batch.input_file_id,
                batch.completion_window,
                None if batch.metadata is None else json.dumps(batch.metadata),
                batch.status, batch.created_at, batch.expires_at, batch.output_expires_s,
            ),
        )  # fmt: skip
        return batch

    def get(self, batch_id: str) -> BatchRecord | None:
        rows = self.db.query("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def list(self, after: str | None, limit: int, project: str) -> Page[BatchRecord]:
        """One project's batches, newest first; `after` is the last id of the previous page
        (another project's id is a cursor to nothing)."""
        where, args = "project = ?", [project]
        if after:
            found = self.db.query(
                "SELECT seq FROM batches WHERE id = ? AND project = ?", (after, project)
            )
            if not found:
                return Page([], False)
            where, args = f"{where} AND seq < ?", [*args, found[0]["seq"]]
        sql = f"SELECT * FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?"
        rows = self.db.query(sql, (*args, limit + 1))
        return Page([_batch(r) for r in rows[:limit]], len(rows) > limit)

    def count_by_status(self) -> dict[str, int]:
        """Every project's batches by status (/metrics): one grouped count."""
        rows = self.db.query("SELECT status, COUNT(*) FROM batches GROUP BY status")
        return {status: count for status, count in rows}

    def with_status(self, *statuses: str) -> list[BatchRecord]:
        marks = ",".join("?" * len(statuses))
        sql = f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq"
        return [_batch(r) for r in self.db.query(sql, statuses)]

    def transition(self, batch_id: str, to: str, allowed_from: tuple[str, ...], **fields) -> bool:
        """Compare-and-set: moves the batch to `to` only from one of `allowed_from` (cancel
        from a request and the runner's own steps race; the first to land wins)."""
        if to in STAMPS:
            fields.setdefault(STAMPS[to], int(time.time()))
        if "errors" in fields:
            fields["errors"] = json.dumps([_error_dict(e) for e in fields["errors"]])
        sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
        marks = ",".join("?" * len(allowed_from))
        sql = f"UPDATE batches SET {sets} WHERE id = ? AND status IN ({marks})"
        return self.db.execute(sql, (to, *fields.values(), batch_id, *allowed_from)) == 1

    # --- results ----------------------------------------------------------------------------

    def add_result(self, batch_id: str, r: BatchResult) -> bool:
        """Record one finished request, committed before this returns; False if its custom_id
        already has a result (it is never replaced)."""
        return (
            self.db.execute(
                "INSERT OR IGNORE INTO batch_results (batch_id, custom_id, line, ok, result,"
                " input_tokens, output_tokens) VALUES (?,?,?,?,?,?,?)",
                (
                    batch_id,
                    r.custom_id,
                    r.line,
                    int(r.ok),
                    r.result,
                    r.input_tokens,
                    r.output_tokens,
                ),
            )  # fmt: skip
            == 1
        )

    def done_ids(self, batch_id: str) -> set[str]:
        rows = self.db.query("SELECT custom_id FROM batch_results WHERE batch_id = ?", (batch_id,))
        return {r["custom_id"] for r in rows}

    def progress(self, batch_id: str) -> Progress:
        row = self.db.query(
            "SELECT COALESCE(SUM(ok), 0), COUNT(*), COALESCE(SUM(input_tokens), 0),"
            " COALESCE(SUM(output_tokens), 0) FROM batch_results WHERE batch_id = ?",
            (batch_id,),
        )[0]
        return Progress(row[0], row[1] - row[0], row[2], row[3])

    def results(self, batch_id: str, ok: bool) -> list[str]:
        """The output (ok) or error lines, in input order."""
        rows = self.db.query(
            "SELECT result FROM batch_results WHERE batch_id = ? AND ok = ? ORDER BY line",
            (batch_id, int(ok)),
        )
        return [r["result"] for r in rows]


def _error_dict(e: LineError) -> dict[str, Any]:
    return {"code": e.code, "message": e.message, "line": e.line, "param": e.param}
