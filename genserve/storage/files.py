"""Uploaded files: bytes under <data_dir>/files/<id>, metadata in the `files` table.

An upload is staged in a temporary file beside its final place, fsynced, renamed into place
and the directory fsynced before its row is committed: once an upload has been answered,
neither its bytes nor its row can be lost or seen half-written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from genserve.storage.db import DEFAULT_PROJECT, Database, new_id

CHUNK = 1 << 20
STAGING_SUFFIX = ".part"


class FileTooLargeError(ValueError):
    """The upload is over the server's size limit."""


class QuotaExceededError(ValueError):
    """Storing the upload would take its project over a quota."""


@dataclass(frozen=True, slots=True)
class FileQuota:
    """What one project's files may add up to."""

    max_files: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_files < 1 or self.max_bytes < 1:
            raise ValueError("file quotas must be >= 1")


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    project: str = DEFAULT_PROJECT  # the owner: other projects never see it
    expires_at: int | None = None  # gone from then on (OpenAI's expires_after); None: kept


@dataclass(frozen=True, slots=True)
class StagedUpload:
    """Bytes written and fsynced, not yet visible: commit() or discard() it."""

    path: Path
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class FilePage:
    data: list[FileRecord]
    has_more: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A file not yet expired; the query's next argument is the time now.
LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _now() -> int:
    return int(time.time())


def _record(row) -> FileRecord:
    return FileRecord(
        row["id"], row["filename"], row["purpose"], row["bytes"], row["sha256"],
        row["created_at"], row["project"], row["expires_at"],
    )  # fmt: skip


class FileStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def sweep(self) -> None:
        """Staged uploads left by a crash were never answered: they can go; so can files
        past their expiry."""
        for part in self.root.glob(f"*{STAGING_SUFFIX}"):
            part.unlink(missing_ok=True)
        self.delete_expired()

    def delete_expired(self) -> int:
        """Delete the files whose expiry has passed (already invisible); how many went."""
        rows = self.db.query(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (_now(),)
        )
        return sum(self.delete(row["id"], expired=True) for row in rows)

    def stage(self, src: BinaryIO, max_bytes: int) -> StagedUpload:
        """Copy src to a staging file, refusing more than max_bytes. Blocking: run in a thread."""
        path = self.root / f".{new_id('upload')}{STAGING_SUFFIX}"
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLargeError(f"the file is larger than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return StagedUpload(path, size, digest.hexdigest())

    def commit(
        self,
        staged: StagedUpload,
        filename: str,
        purpose: str,
        project: str = DEFAULT_PROJECT,
        quota: FileQuota | None = None,
        expires_after_s: int | None = None,
    ) -> FileRecord:
        """Make the upload visible to `project`; QuotaExceededError if it would not fit."""
        now = int(time.time())
        expires_at = None if expires_after_s is None else now + expires_after_s
        record = FileRecord(
            new_id("file"), filename, purpose, staged.bytes, staged.sha256, now, project,
            expires_at,
        )  # fmt: skip
        final = self.path(record.id)
        os.replace(staged.path, final)
        _fsync_dir(self.root)
        try:
            # Checked and inserted in one transaction: concurrent uploads cannot both fit.
            with self.db.transaction() as cur:
                if quota is not None:
                    _check_quota(cur, project, record.bytes, quota)
                cur.execute(
                    "INSERT INTO files (id, filename, purpose, bytes, sha256, created_at, project,"
                    " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.id, filename, purpose, record.bytes, record.sha256,
                     record.created_at, project, expires_at),
                )  # fmt: skip
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return record

    def check_room(self, project: str, adding: int, quota: FileQuota) -> None:
        """QuotaExceededError now where a file of `adding` bytes would not fit (an upload
        in parts is told before its parts are sent; its commit checks again)."""
        with self.db.transaction() as cur:
            _check_quota(cur, project, adding, quota)

    def discard(self, staged: StagedUpload) -> None:
        staged.path.unlink(missing_ok=True)

    def hold(self, file_id: str, dest: Path) -> Path:
        """A link of dest to the file's bytes that outlives a delete of the file (a job's or a
        batch's input): a hard link, a copy where the filesystem refuses links.
        FileNotFoundError if the file is gone already."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(self.path(file_id), dest)
        except FileNotFoundError:
            raise
        except OSError:  # a filesystem without hard links
            shutil.copyfile(self.path(file_id), dest)
        return dest

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def get(self, file_id: str) -> FileRecord | None:
        """The file, unless it is missing or has expired (its bytes go at the next sweep)."""
        rows = self.db.query(f"SELECT * FROM files WHERE id = ? AND {LIVE}", (file_id, _now()))
        return _record(rows[0]) if rows else None

    def list(
        self,
        purpose: str | None,
        limit: int,
        order: str = "desc",
        after: str | None = None,
        project: str = DEFAULT_PROJECT,
    ) -> FilePage:
        """One project's files; another project's id as `after` is a cursor to nothing."""
        where, args = ["project = ?", LIVE], [project, _now()]
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            rows = self.db.query(
                "SELECT seq FROM files WHERE id = ? AND project = ?", (after, project)
            )
            if not rows:
                return FilePage([], False)  # a deleted cursor: nothing can follow it
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(rows[0]["seq"])
        direction = "DESC" if order == "desc" else "ASC"
        sql = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY seq {direction} LIMIT ?"
        rows = self.db.query(sql, (*args, limit + 1))
        return FilePage([_record(r) for r in rows[:limit]], len(rows) > limit)

    def delete(self, file_id: str, project: str | None = None, expired: bool = False) -> bool:
        """Delete the file (only if `project` owns it, when given); an expired one only when
        asked (`expired`: the sweep), as to everyone else it no longer exists."""
        sql, args = "DELETE FROM files WHERE id = ?", (file_id,)
        if project is not None:
            sql, args = sql + " AND project = ?", (file_id, project)
        if not expired:
            sql, args = f"{sql} AND {LIVE}", (*args, _now())
        # The row goes first: a crash in between leaves an orphan file, never a row without bytes.
        if not self.db.execute(sql, args):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True


def _check_quota(cur, project: str, adding: int, quota: FileQuota) -> None:  # noqa: ANN001
    count, total = cur.execute(
        f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE project = ? AND {LIVE}",
        (project, _now()),
    ).fetchone()
    if count + 1 > quota.max_files:
        raise QuotaExceededError(
            f"this project already holds {count} files, its quota; delete some to upload more"
        )
    if total + adding > quota.max_bytes:
        raise QuotaExceededError(
            f"this project's files would take {total + adding} bytes, over its quota of "
            f"{quota.max_bytes}; delete some to upload more"
        )
