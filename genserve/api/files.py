"""/v1/files: upload (multipart), list, retrieve, delete, content — OpenAI's File objects.

Uploads are limited to ServerConfig.storage.max_file_bytes (over it: 400, param "file"), and a
`fine-tune` upload is checked line by line before it is stored, so a bad file is refused at
once with the numbers of its bad lines rather than failing a job later. A file belongs to the
project of the key that uploaded it: another project's file answers 404 exactly as a missing
one, and a project's files together stay within ServerConfig.quotas (429 `quota_exceeded`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from genserve.api.auth import Principal, principal
from genserve.api.errors import APIError, bad_request
from genserve.api.models import runtime_of
from genserve.api.pages import listing
from genserve.config import QuotaConfig
from genserve.storage.files import (
    CHUNK,
    FileQuota,
    FileRecord,
    FileStore,
    FileTooLargeError,
    QuotaExceededError,
    StagedUpload,
)
from genserve.training.dataset import DatasetError, check_file

router = APIRouter()

# The purposes that OpenAI's upload request and its File object both know.
PURPOSES = ("fine-tune", "batch", "assistants", "vision", "user_data")
MULTIPART_SLACK = 1 << 20  # room for boundaries and headers around the file in the body


def file_store(request: Request) -> FileStore:
    return runtime_of(request).file_store()


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    return APIError(404, f"No such File object: {file_id}", param, "file_not_found")


def file_card(record: FileRecord) -> dict:
    card = {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",  # checked at upload: a stored file is always usable
    }
    if record.expires_at is not None:
        card["expires_at"] = record.expires_at
    return card


# OpenAI's bounds on expires_after.seconds (FileExpirationAfter): an hour to 30 days.
EXPIRY_SECONDS = (3600, 2_592_000)


def expiry_seconds(anchor: object, seconds: object, param: str = "expires_after") -> int:
    """The seconds of an expiration policy ({"anchor": "created_at", "seconds": n}), or 400."""
    low, high = EXPIRY_SECONDS
    if anchor != "created_at":
        raise bad_request(f"`{param}.anchor` must be created_at", param)
    number = seconds if isinstance(seconds, int) and not isinstance(seconds, bool) else None
    if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit():  # multipart: text
        number = int(seconds)
    if number is None or not low <= number <= high:
        raise bad_request(f"`{param}.seconds` must be an integer in [{low}, {high}]", param)
    return number


def _form_expiry(form) -> int | None:  # noqa: ANN001 - starlette's FormData
    """expires_after as the official client sends it in a multipart body (flattened as
    expires_after[anchor] and expires_after[seconds]); None when absent."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        if "expires_after" in form:
            raise bad_request("`expires_after` needs anchor and seconds", "expires_after")
        return None
    return expiry_seconds(anchor, seconds)


def get_record(
    store: FileStore, file_id: str, who: Principal, param: str = "file_id"
) -> FileRecord:
    """The file, if `who`'s project owns it; 404 alike for a missing and a foreign one."""
    record = store.get(file_id)
    if record is None or record.project != who.project:
        raise file_not_found(file_id, param)
    return record


def quota_exceeded(message: str, quotas: QuotaConfig) -> APIError:
    """429 with Retry-After, as every limit here; `x-should-retry: false` tells the official
    client not to retry by itself, since waiting alone does not free a quota."""
    retry = str(quotas.retry_after_s)
    headers = {"Retry-After": retry, "x-should-retry": "false"}
    return APIError(429, f"Quota exceeded: {message}.", code="quota_exceeded", headers=headers)


def _check_length(request: Request, limit: int) -> None:
    """Refuse a body that cannot fit before reading any of it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        raise too_large(limit)


def too_large(limit: int) -> APIError:
    return bad_request(
        f"The file is too large: this server accepts files of at most {limit} bytes.",
        param="file",
        code="file_too_large",
    )


@dataclass(frozen=True, slots=True)
class Upload:
    """What one upload is allowed: its size limit, and whose quota it counts against."""

    limit: int
    project: str
    quotas: QuotaConfig
    expires_after_s: int | None = None  # its expiration policy, if it has one


def store_upload(
    store: FileStore, src: BinaryIO, name: str, purpose: str, up: Upload,
    check: Callable[[StagedUpload], None] = lambda _: None, param: str = "file",
) -> FileRecord:  # fmt: skip
    """Stage, check (`check`, then a fine-tune file's lines) and commit an upload; 400s name
    `param`. Blocking (disk, fsync): runs in a thread."""
    try:
        staged = store.stage(src, up.limit)
    except FileTooLargeError:
        raise too_large(up.limit) from None
    quota = FileQuota(up.quotas.max_files, up.quotas.max_file_bytes)
    try:
        check(staged)
        if purpose == "fine-tune":
            check_file(staged.path)
        return store.commit(staged, name, purpose, up.project, quota, up.expires_after_s)
    except DatasetError as e:
        raise bad_request(str(e), param=param, code="invalid_file_format") from None
    except QuotaExceededError as e:
        raise quota_exceeded(str(e), up.quotas) from None
    finally:
        store.discard(staged)  # a no-op once committed: the staged name is gone


@router.post("/v1/files")
async def upload_file(request: Request) -> dict:
    store = file_store(request)
    config = request.app.state.config
    up = Upload(config.storage.max_file_bytes, principal(request).project, config.quotas)
    _check_length(request, up.limit)
    async with request.form(max_files=1, max_fields=16) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise bad_request("`file` is required, as a multipart file field", param="file")
        if purpose not in PURPOSES:
            raise bad_request(f"`purpose` must be one of {', '.join(PURPOSES)}", param="purpose")
        name = upload.filename or "upload"
        up = replace(up, expires_after_s=_form_expiry(form))
        record = await asyncio.to_thread(store_upload, store, upload.file, name, purpose, up)
    return file_card(record)


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict:
    page = file_store(request).list(purpose, limit, order, after, principal(request).project)
    return listing([file_card(r) for r in page.data], page.has_more)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict:
    return file_card(get_record(file_store(request), file_id, principal(request)))


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    if not file_store(request).delete(file_id, principal(request).project):
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> StreamingResponse:
    store = file_store(request)
    record = get_record(store, file_id, principal(request))
    try:
        # Opened now, so a delete while it streams cannot cut it short.
        f = store.path(file_id).open("rb")
    except FileNotFoundError:
        raise file_not_found(file_id) from None
    headers = {"content-length": str(record.bytes)}
    return StreamingResponse(_chunks(f), media_type="application/octet-stream", headers=headers)
