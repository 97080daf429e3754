"""Token usage per minute, project, key, model and batch: what OpenAI's usage API reports
(/v1/organization/usage/completions and /embeddings, api/usage.py).

Requests add to counters in memory (a dict update on the event loop: no disk write per
request); `flush` adds them to the `usage` table in one transaction, every FLUSH_S seconds, at
shutdown, and before every read (so a report always includes the last request). A crash loses
at most the last FLUSH_S seconds of counts, never what was flushed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from genserve.storage.db import Database

FLUSH_S = 10.0
KINDS = ("completions", "embeddings")


@dataclass(frozen=True, slots=True)
class Used:
    """One request's tokens, as its answer's usage counts them."""

    kind: str  # completions (chat, completions, responses) or embeddings
    model: str
    input_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0  # of the input, served by the prefix cache


@dataclass(frozen=True, slots=True)
class Key:
    """What a minute's counts are kept apart by."""

    minute: int  # unix seconds, a multiple of 60
    kind: str
    project: str
    key_id: str | None  # None: a Batch API line (it runs apart from any key's request)
    model: str
    batch: bool


@dataclass(slots=True)
class Counts:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: Key
    counts: Counts


class UsageLedger:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()  # add runs on the loop, flush on a thread
        self._pending: dict[Key, Counts] = {}

    def add(
        self, used: Used, project: str, key_id: str | None, batch: bool = False,
        at: float | None = None,
    ) -> None:  # fmt: skip
        minute = int(time.time() if at is None else at) // 60 * 60
        key = Key(minute, used.kind, project, key_id, used.model, batch)
        with self._lock:
            c = self._pending.setdefault(key, Counts())
            c.input_tokens += used.input_tokens
            c.output_tokens += used.output_tokens
            c.cached_tokens += used.cached_tokens
            c.requests += 1

    def take(self) -> dict[Key, Counts]:
        """The counts gathered since the last take, removed from memory."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def merge(self, rows: Sequence[UsageRow]) -> None:
        """Add counts gathered elsewhere (a failed flush's, another replica's) to memory: the
        next flush writes them with what came meanwhile."""
        with self._lock:
            for row in rows:
                mine = self._pending.setdefault(row.key, Counts())
                mine.input_tokens += row.counts.input_tokens
                mine.output_tokens += row.counts.output_tokens
                mine.cached_tokens += row.counts.cached_tokens
                mine.requests += row.counts.requests

    def flush(self) -> int:
        """Add the counts gathered since the last flush to the table; how many rows."""
        pending = self.take()
        if not pending:
            return 0
        try:
            with self.db.transaction() as cur:
                for k, c in pending.items():
                    cur.execute(
                        "INSERT INTO usage (minute, kind, project, key_id, model, batch,"
                        " input_tokens, output_tokens, cached_tokens, requests)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (minute, kind, project, key_id, model, batch) DO UPDATE SET"
                        " input_tokens = input_tokens + excluded.input_tokens,"
                        " output_tokens = output_tokens + excluded.output_tokens,"
                        " cached_tokens = cached_tokens + excluded.cached_tokens,"
                        " requests = requests + excluded.requests",
                        (k.minute, k.kind, k.project, k.key_id or "", k.model, int(k.batch),
                         c.input_tokens, c.output_tokens, c.cached_tokens, c.requests),
                    )  # fmt: skip
        except BaseException:
            self.merge(as_rows(pending))  # kept for the next flush
            raise
        return len(pending)

    def rows(
        self, kind: str, start: int, end: int, projects: Sequence[str] = (),
        key_ids: Sequence[str] = (), models: Sequence[str] = (), batch: bool | None = None,
    ) -> list[UsageRow]:  # fmt: skip
        """The minutes in [start, end) of one kind, filtered; flushed first."""
        self.flush()
        where, args = ["kind = ?", "minute >= ?", "minute < ?"], [kind, start, end]
        for column, values in (("project", projects), ("key_id", key_ids), ("model", models)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if batch is not None:
            where.append("batch = ?")
            args.append(int(batch))
        sql = f"SELECT * FROM usage WHERE {' AND '.join(where)} ORDER BY minute"
        return [_row(r) for r in self.db.query(sql, tuple(args))]


def _row(r) -> UsageRow:  # noqa: ANN001 - a sqlite3.Row
    key = Key(r["minute"], r["kind"], r["project"], r["key_id"] or None, r["model"],
              bool(r["batch"]))  # fmt: skip
    return UsageRow(key, Counts(r["input_tokens"], r["output_tokens"], r["cached_tokens"],
                                r["requests"]))  # fmt: skip


def as_rows(pending: dict[Key, Counts]) -> list[UsageRow]:
    return [UsageRow(k, c) for k, c in pending.items()]
