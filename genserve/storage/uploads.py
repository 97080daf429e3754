"""OpenAI's Uploads: a file sent in parts, then completed into a File. Parts are bytes under
<data_dir>/uploads/<upload id>/<part id>, each fsynced before it is answered, their rows in
`upload_parts`; the upload's row in `uploads`. Completing joins the parts in the order the
caller names into one staged file (storage/files.py's commit makes it a File); completing,
cancelling or expiring an upload deletes its parts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from genserve.storage.db import Database, new_id
from genserve.storage.files import CHUNK, FileTooLargeError

COMPLETING = "completing"  # one call is making its File: no part, no other completion
UPLOAD_TTL_S = 3600  # an upload not completed within an hour expires, as on OpenAI
MAX_PART_BYTES = 64 * 2**20  # OpenAI's bound on one part


class UploadStateError(ValueError):
    """The upload is no longer pending (completed, cancelled or expired)."""


class PartsError(ValueError):
    """The parts named do not make the upload: unknown, repeated, or the wrong total."""


@dataclass(frozen=True, slots=True)
class UploadRecord:
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int  # what the caller said the file will hold
    mime_type: str
    status: str  # pending, completed, cancelled, expired
    created_at: int
    expires_at: int
    file_id: str | None = None  # the File it became, once completed
    file_expires_after_s: int | None = None  # the File's own expiry policy (expires_after)


@dataclass(frozen=True, slots=True)
class PartRecord:
    id: str
    upload_id: str
    bytes: int
    created_at: int


def _upload(row) -> UploadRecord:  # noqa: ANN001 - a sqlite3.Row
    status = row["status"]
    if status == COMPLETING:  # to its caller, pending until its File is made
        status = "pending"
    if status == "pending" and row["expires_at"] <= int(time.time()):
        status = "expired"
    return UploadRecord(
        row["id"], row["project"], row["filename"], row["purpose"], row["bytes"],
        row["mime_type"], status, row["created_at"], row["expires_at"], row["file_id"],
        row["file_expires_s"],
    )  # fmt: skip


class Joined:
    """The parts' bytes one after another, read as one file (FileStore.stage reads it), with
    their MD5 taken on the way (OpenAI's optional check at completion)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._open: BinaryIO | None = None
        self.md5 = hashlib.md5(usedforsecurity=False)

    def read(self, size: int = CHUNK) -> bytes:
        while True:
            if self._open is None:
                if not self._paths:
                    return b""
                self._open = self._paths.pop(0).open("rb")
            chunk = self._open.read(size)
            if chunk:
                self.md5.update(chunk)
                return chunk
            self._open.close()
            self._open = None

    def close(self) -> None:
        if self._open is not None:
            self._open.close()


class UploadStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def sweep(self) -> int:
        """Delete the parts of every upload that can no longer complete (ended, or past its
        hour; a crash may have left either); how many uploads' parts went. A completion a
        restart cut short is pending again (its File was not made, or is an orphan file)."""
        self.db.execute("UPDATE uploads SET status = 'pending' WHERE status = ?", (COMPLETING,))
        rows = self.db.query(
            "SELECT id FROM uploads WHERE status != 'pending' OR expires_at <= ?",
            (int(time.time()),),
        )
        gone = {row["id"] for row in rows}
        known = {row["id"] for row in self.db.query("SELECT id FROM uploads")}
        for folder in self.root.iterdir():  # folders without a row: a crash before its insert
            if folder.name in gone or folder.name not in known:
                self._drop_parts(folder.name)
        return len(gone)

    def create(
        self, project: str, filename: str, purpose: str, size: int, mime_type: str,
        file_expires_after_s: int | None,
    ) -> UploadRecord:  # fmt: skip
        now = int(time.time())
        record = UploadRecord(
            new_id("upload").replace("-", "_", 1), project, filename, purpose, size, mime_type,
            "pending", now, now + UPLOAD_TTL_S, None, file_expires_after_s,
        )  # fmt: skip
        self.db.execute(
            "INSERT INTO uploads (id, project, filename, purpose, bytes, mime_type, status,"
            " created_at, expires_at, file_expires_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, project, filename, purpose, size, mime_type, "pending", now,
             record.expires_at, file_expires_after_s),
        )  # fmt: skip
        return record

    def pending(self, project: str) -> int:
        """The project's uploads that may still take parts."""
        rows = self.db.query(
            "SELECT COUNT(*) AS n FROM uploads WHERE project = ? AND status = 'pending'"
            " AND expires_at > ?",
            (project, int(time.time())),
        )
        return int(rows[0]["n"])

    def get(self, upload_id: str, project: str) -> UploadRecord | None:
        rows = self.db.query(
            "SELECT * FROM uploads WHERE id = ? AND project = ?", (upload_id, project)
        )
        return _upload(rows[0]) if rows else None

    def add_part(self, upload: UploadRecord, src: BinaryIO) -> PartRecord:
        """Store one part (fsynced) and count it; the parts together may not pass the
        upload's bytes. Blocking: run in a thread."""
        folder = self.root / upload.id
        folder.mkdir(exist_ok=True)
        part = PartRecord(new_id("part").replace("-", "_", 1), upload.id, 0, int(time.time()))
        path = folder / part.id
        try:
            size = _write(src, path, MAX_PART_BYTES)
            with self.db.transaction() as cur:  # checked and counted at once: parts race
                row = cur.execute(
                    "SELECT status, expires_at, bytes FROM uploads WHERE id = ?", (upload.id,)
                ).fetchone()
                if row["status"] != "pending" or row["expires_at"] <= part.created_at:
                    raise UploadStateError(f"Upload {upload.id} is no longer pending")
                (held,) = cur.execute(
                    "SELECT COALESCE(SUM(bytes), 0) FROM upload_parts WHERE upload_id = ?",
                    (upload.id,),
                ).fetchone()
                if held + size > row["bytes"]:
                    raise FileTooLargeError(
                        f"the parts would hold {held + size} bytes; the upload was created "
                        f"for {row['bytes']}"
                    )
                cur.execute(
                    "INSERT INTO upload_parts (id, upload_id, bytes, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (part.id, upload.id, size, part.created_at),
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return PartRecord(part.id, upload.id, size, part.created_at)

    def joined(self, upload: UploadRecord, part_ids: Sequence[str]) -> Joined:
        """The named parts' bytes in that order, checked: each the upload's, none twice, all
        of them making the size the upload was created for."""
        if not part_ids:
            raise PartsError("part_ids must name the upload's parts, in order")
        if len(set(part_ids)) != len(part_ids):
            raise PartsError("part_ids names a part twice")
        rows = self.db.query("SELECT id, bytes FROM upload_parts WHERE upload_id = ?", (upload.id,))
        sizes = {row["id"]: row["bytes"] for row in rows}
        unknown = [p for p in part_ids if p not in sizes]
        if unknown:
            raise PartsError(f"no part {unknown[0]} in upload {upload.id}")
        total = sum(sizes[p] for p in part_ids)
        if total != upload.bytes:
            raise PartsError(
                f"the parts named hold {total} bytes; the upload was created for {upload.bytes}"
            )
        return Joined([self.root / upload.id / p for p in part_ids])

    def claim(self, upload: UploadRecord) -> bool:
        """Take a pending upload to complete it (False: not pending, or another call has it);
        `release` or `finish` it."""
        return bool(self.db.execute(
            "UPDATE uploads SET status = ? WHERE id = ? AND status = 'pending' AND expires_at > ?",
            (COMPLETING, upload.id, int(time.time())),
        ))  # fmt: skip

    def release(self, upload: UploadRecord) -> None:
        """A completion that failed (bad parts, a checksum, a quota): pending again."""
        self.db.execute(
            "UPDATE uploads SET status = 'pending' WHERE id = ? AND status = ?",
            (upload.id, COMPLETING),
        )

    def finish(self, upload: UploadRecord, status: str, file_id: str | None = None) -> bool:
        """Mark an upload completed (from its claim) or cancelled (while pending): False if
        another call ended it first. Then its parts go."""
        was = COMPLETING if status == "completed" else "pending"
        changed = self.db.execute(
            "UPDATE uploads SET status = ?, file_id = ? WHERE id = ? AND status = ?",
            (status, file_id, upload.id, was),
        )
        if changed:
            self._drop_parts(upload.id)
        return bool(changed)

    def _drop_parts(self, upload_id: str) -> None:
        self.db.execute("DELETE FROM upload_parts WHERE upload_id = ?", (upload_id,))
        shutil.rmtree(self.root / upload_id, ignore_errors=True)


def _write(src: BinaryIO, path: Path, max_bytes: int) -> int:
    size = 0
    with path.open("wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise FileTooLargeError(f"a part holds at most {max_bytes} bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size
