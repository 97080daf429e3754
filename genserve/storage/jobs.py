"""Fine-tuning jobs, their events and checkpoints: the `jobs`, `job_events` and
`job_checkpoints` tables. The manager is the only writer while the server runs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from genserve.storage.db import DEFAULT_PROJECT, Database, new_id

# Unfinished: cancel and failure reach these, and a project's job quota counts them (a paused
# job keeps its data and checkpoints, and may be resumed at any time).
ACTIVE = ("validating_files", "queued", "running", "pausing", "paused")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = (*ACTIVE, *TERMINAL)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict[str, Any]  # n_epochs, batch_size, learning_rate_multiplier (+ beta)
    created_at: int
    status: str = "validating_files"
    metadata: dict[str, str] | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: JobError | None = None
    crashes: int = 0  # worker exits without a result (crash, SIGKILL) the job has survived
    adapter_deleted: bool = False
    result_files: tuple[str, ...] = ()  # file ids: the step metrics CSV once it succeeded
    project: str = DEFAULT_PROJECT  # the owner: the job, its files and its model are its own
    method: str = "supervised"  # OpenAI's method.type: supervised | dpo


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str  # info | warn | error
    type: str  # message | metrics
    message: str
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step: int
    epoch: int
    path: str  # folder with the adapter and the optimizer state after `step`
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    has_more: bool


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _job(row) -> JobRecord:
    err = _loads(row["error"])
    return JobRecord(
        id=row["id"],
        model=row["model"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        suffix=row["suffix"],
        seed=row["seed"],
        hyperparameters=json.loads(row["hyperparameters"]),
        created_at=row["created_at"],
        status=row["status"],
        metadata=_loads(row["metadata"]),
        finished_at=row["finished_at"],
        fine_tuned_model=row["fine_tuned_model"],
        trained_tokens=row["trained_tokens"],
        error=JobError(**err) if err else None,
        crashes=row["crashes"],
        adapter_deleted=bool(row["adapter_deleted"]),
        result_files=tuple(_loads(row["result_files"]) or ()),
        project=row["project"],
        method=row["method"],
    )


def _event(row) -> EventRecord:
    return EventRecord(
        row["id"],
        row["job_id"],
        row["created_at"],
        row["level"],
        row["type"],
        row["message"],
        _loads(row["data"]),
    )


def _checkpoint(row) -> CheckpointRecord:
    return CheckpointRecord(
        row["id"],
        row["job_id"],
        row["created_at"],
        row["step"],
        row["epoch"],
        row["path"],
        json.loads(row["metrics"]),
    )


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- jobs -------------------------------------------------------------------------------

    def create(self, job: JobRecord) -> JobRecord:
        self.db.execute(
            "INSERT INTO jobs (id, model, training_file, validation_file, suffix, seed,"
            " hyperparameters, metadata, status, created_at, project, method)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                job.id,
                job.model,
                job.training_file,
                job.validation_file,
                job.suffix,
                job.seed,
                json.dumps(job.hyperparameters),
                None if job.metadata is None else json.dumps(job.metadata),
                job.status,
                job.created_at,
                job.project,
                job.method,
            ),
        )
        return job

    def get(self, job_id: str) -> JobRecord | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(
        self, after: str | None, limit: int, project: str = DEFAULT_PROJECT
    ) -> Page[JobRecord]:
        """One project's jobs, newest first; `after` is the last id of the previous page."""
        return Page(*self._page("jobs", "project = ?", (project,), after, limit, _job))

    def count_active(self, project: str) -> int:
        """The project's unfinished jobs (its quota counts them)."""
        marks = ",".join("?" * len(ACTIVE))
        sql = f"SELECT COUNT(*) FROM jobs WHERE project = ? AND status IN ({marks})"
        return self.db.query(sql, (project, *ACTIVE))[0][0]

    def count_by_status(self) -> dict[str, int]:
        """Every project's jobs by status (/metrics): one grouped count, no row read whole."""
        rows = self.db.query("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {status: count for status, count in rows}

    def with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ",".join("?" * len(statuses))
        rows = self.db.query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)
        return [_job(r) for r in rows]

    def transition(self, job_id: str, to: str, allowed_from: tuple[str, ...], **fields) -> bool:
        """Compare-and-set: moves the job to `to` only from one of `allowed_from`.

        Cancel (from a request) and the end of training (from the manager) race; whichever
        lands first wins and the other sees False.
        """
        if to in TERMINAL:
            fields.setdefault("finished_at", int(time.time()))
        if "error" in fields and fields["error"] is not None:
            err: JobError = fields["error"]
            fields["error"] = json.dumps(
                {"code": err.code, "message": err.message, "param": err.param}
            )
        if "result_files" in fields:
            fields["result_files"] = json.dumps(list(fields["result_files"]))
        sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
        marks = ",".join("?" * len(allowed_from))
        sql = f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})"
        return self.db.execute(sql, (to, *fields.values(), job_id, *allowed_from)) == 1

    def set_hyperparameters(self, job_id: str, hyperparameters: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE jobs SET hyperparameters = ? WHERE id = ?",
            (json.dumps(hyperparameters), job_id),
        )

    def count_crash(self, job_id: str) -> int:
        self.db.execute("UPDATE jobs SET crashes = crashes + 1 WHERE id = ?", (job_id,))
        return self.db.query("SELECT crashes FROM jobs WHERE id = ?", (job_id,))[0][0]

    def mark_adapter_deleted(self, model_id: str) -> bool:
        sql = "UPDATE jobs SET adapter_deleted = 1 WHERE fine_tuned_model = ?"
        return self.db.execute(sql, (model_id,)) > 0

    def served_adapters(self) -> list[JobRecord]:
        """Succeeded jobs whose model has not been deleted: what a restart serves again."""
        rows = self.db.query(
            "SELECT * FROM jobs WHERE status = 'succeeded' AND adapter_deleted = 0"
            " AND fine_tuned_model IS NOT NULL ORDER BY seq"
        )
        return [_job(r) for r in rows]

    # --- events -----------------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> EventRecord:
        event = EventRecord(new_id("ftevent"), job_id, int(time.time()), level, type, message, data)
        self.db.execute(
            "INSERT INTO job_events (id, job_id, created_at, level, type, message, data)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                event.id,
                job_id,
                event.created_at,
                level,
                type,
                message,
                None if data is None else json.dumps(data),
            ),
        )
        return event

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """The data of every metrics event, oldest first."""
        rows = self.db.query(
            "SELECT data FROM job_events WHERE job_id = ? AND type = 'metrics' ORDER BY seq",
            (job_id,),
        )
        return [json.loads(r["data"]) for r in rows if r["data"]]

    def events(self, job_id: str, after: str | None, limit: int) -> Page[EventRecord]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""
        return Page(*self._page("job_events", "job_id = ?", (job_id,), after, limit, _event))

    # --- checkpoints ------------------------------------------------------------------------

    def add_checkpoint(
        self, job_id: str, step: int, epoch: int, path: str, metrics: dict[str, Any]
    ) -> CheckpointRecord:
        now = int(time.time())
        ckpt = CheckpointRecord(new_id("ftckpt"), job_id, now, step, epoch, path, metrics)
        self.db.execute(
            "INSERT INTO job_checkpoints (id, job_id, created_at, step, epoch, path, metrics)"
            " VALUES (?,?,?,?,?,?,?)",
            (ckpt.id, job_id, ckpt.created_at, step, epoch, path, json.dumps(metrics)),
        )
        return ckpt

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> Page[CheckpointRecord]:
        where = "job_id = ?"
        return Page(*self._page("job_checkpoints", where, (job_id,), after, limit, _checkpoint))

    def last_checkpoint(self, job_id: str) -> CheckpointRecord | None:
        rows = self.db.query(
            "SELECT * FROM job_checkpoints WHERE job_id = ? ORDER BY step DESC, seq DESC LIMIT 1",
            (job_id,),
        )
        return _checkpoint(rows[0]) if rows else None

    # --- shared -----------------------------------------------------------------------------

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int, make):
        """(rows, has_more), newest first, strictly older than the `after` cursor (which must
        itself match `where`: another project's or job's id is a cursor to nothing)."""
        if after:
            found = self.db.query(
                f"SELECT seq FROM {table} WHERE id = ? AND {where}", (after, *args)
            )
            if not found:
                return [], False
            where, args = f"{where} AND seq < ?", (*args, found[0]["seq"])
        sql = f"SELECT * FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?"
        rows = self.db.query(sql, (*args, limit + 1))
        return [make(r) for r in rows[:limit]], len(rows) > limit
