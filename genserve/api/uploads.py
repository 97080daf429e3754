"""/v1/uploads: OpenAI's Uploads API, a file sent in parts (up to 64 MB each) and completed
into a File, as `client.uploads.upload_file_chunked` does it. An upload belongs to its key's
project (another project gets 404, as for a missing one), takes parts for an hour, and counts
against the project's file quotas when created (429 then, before any part is sent) and again
when completed. Completing joins the parts in the order named, checks the total against the
bytes declared (and the MD5 when given, and a fine-tune file's lines), and makes the File;
a completion refused for any of those leaves the upload pending, to be completed again."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, StrictInt
from starlette.datastructures import UploadFile

from genserve.api.auth import principal
from genserve.api.errors import APIError, bad_request
from genserve.api.files import (
    PURPOSES,
    Upload,
    expiry_seconds,
    file_card,
    file_store,
    quota_exceeded,
    store_upload,
    too_large,
)
from genserve.api.models import runtime_of
from genserve.api.schemas import WireModel
from genserve.storage.files import FileQuota, QuotaExceededError, StagedUpload
from genserve.storage.uploads import (
    PartsError,
    UploadRecord,
    UploadStateError,
    UploadStore,
)

router = APIRouter()

MAX_PENDING = 32  # uploads a project may have taking parts at once (their parts are on disk)


class ExpiresAfter(WireModel):
    model_config = ConfigDict(extra="forbid")

    anchor: str
    seconds: int


class CreateUpload(WireModel):
    model_config = ConfigDict(extra="forbid")

    filename: Annotated[str, Field(min_length=1, max_length=512)]
    purpose: str  # one of the purposes /v1/files takes
    bytes: Annotated[StrictInt, Field(ge=1)]
    mime_type: Annotated[str, Field(min_length=1, max_length=256)]
    expires_after: ExpiresAfter | None = None  # the File's, once completed


class CompleteUpload(WireModel):
    model_config = ConfigDict(extra="forbid")

    part_ids: list[str]
    md5: str | None = None


def uploads(request: Request) -> UploadStore:
    return runtime_of(request).upload_store()


def upload_card(record: UploadRecord, file: dict | None = None) -> dict:
    return {
        "id": record.id,
        "object": "upload",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "expires_at": record.expires_at,
        "file": file,
    }


def not_found(upload_id: str) -> APIError:
    return APIError(404, f"No such Upload object: {upload_id}", "upload_id", "not_found")


def found(request: Request, upload_id: str) -> UploadRecord:
    record = uploads(request).get(upload_id, principal(request).project)
    if record is None:
        raise not_found(upload_id)
    return record


def pending(record: UploadRecord) -> UploadRecord:
    if record.status != "pending":
        raise bad_request(f"Upload {record.id} is {record.status}: it takes no more", "upload_id")
    return record


def card_of(request: Request, record: UploadRecord) -> dict:
    """The Upload, with its File once completed (null if that File was deleted since)."""
    if record.file_id is None:
        return upload_card(record)
    file = file_store(request).get(record.file_id)
    return upload_card(record, file_card(file) if file is not None else None)


@router.post("/v1/uploads")
async def create_upload(body: CreateUpload, request: Request) -> dict:
    config, project = request.app.state.config, principal(request).project
    limit = config.storage.max_file_bytes
    if body.purpose not in PURPOSES:
        raise bad_request(f"`purpose` must be one of {', '.join(PURPOSES)}", "purpose")
    if body.bytes > limit:
        raise bad_request(
            f"The file is too large: this server accepts files of at most {limit} bytes.",
            "bytes", "file_too_large",
        )  # fmt: skip
    expires = body.expires_after
    seconds = expiry_seconds(expires.anchor, expires.seconds) if expires is not None else None
    store, quotas = uploads(request), config.quotas
    if store.pending(project) >= MAX_PENDING:
        raise quota_exceeded(f"this project has {MAX_PENDING} uploads pending", quotas)
    try:
        file_store(request).check_room(
            project, body.bytes, FileQuota(quotas.max_files, quotas.max_file_bytes)
        )
    except QuotaExceededError as e:
        raise quota_exceeded(str(e), quotas) from None
    record = store.create(project, body.filename, body.purpose, body.bytes, body.mime_type,
                          seconds)  # fmt: skip
    return upload_card(record)


@router.post("/v1/uploads/{upload_id}/parts")
async def add_part(upload_id: str, request: Request) -> dict:
    record = pending(found(request, upload_id))
    async with request.form(max_files=1, max_fields=4) as form:
        data = form.get("data")
        if not isinstance(data, UploadFile):
            raise bad_request("`data` is required, as a multipart file field", "data")
        try:
            part = await asyncio.to_thread(uploads(request).add_part, record, data.file)
        except UploadStateError as e:
            raise bad_request(str(e), "upload_id") from None
        except ValueError as e:  # FileTooLargeError: past 64 MB, or past the upload's bytes
            raise bad_request(str(e), "data", "file_too_large") from None
    return {"id": part.id, "object": "upload.part", "created_at": part.created_at,
            "upload_id": record.id}  # fmt: skip


@router.post("/v1/uploads/{upload_id}/complete")
async def complete_upload(upload_id: str, body: CompleteUpload, request: Request) -> dict:
    store, record = uploads(request), pending(found(request, upload_id))
    if not store.claim(record):  # another call completes or cancels it now
        raise bad_request(f"Upload {record.id} is being completed or has ended", "upload_id")
    config = request.app.state.config
    up = Upload(config.storage.max_file_bytes, record.project, config.quotas,
                record.file_expires_after_s)  # fmt: skip
    try:
        made = await asyncio.to_thread(_make_file, request, store, record, body, up)
    except BaseException:
        store.release(record)
        raise
    store.finish(record, "completed", made["id"])
    return upload_card(found(request, upload_id), made)


def _make_file(
    request: Request, store: UploadStore, record: UploadRecord, body: CompleteUpload, up: Upload
) -> dict:
    """The parts joined into a File (blocking: a thread); 400 for parts or an MD5 that do not
    make the upload."""
    try:
        joined = store.joined(record, body.part_ids)
    except PartsError as e:
        raise bad_request(str(e), "part_ids") from None

    def same_md5(_staged: StagedUpload) -> None:
        if body.md5 is not None and joined.md5.hexdigest() != body.md5.lower():
            raise bad_request(f"the parts' MD5 is {joined.md5.hexdigest()}, not {body.md5}", "md5")

    try:
        made = store_upload(file_store(request), joined, record.filename, record.purpose, up,
                            same_md5, "part_ids")  # fmt: skip
    except APIError as e:
        if e.code == "file_too_large":  # the declared bytes fit: the server's limit changed
            raise too_large(up.limit) from None
        raise
    finally:
        joined.close()
    return file_card(made)


@router.post("/v1/uploads/{upload_id}/cancel")
async def cancel_upload(upload_id: str, request: Request) -> dict:
    record = pending(found(request, upload_id))
    if not uploads(request).finish(record, "cancelled"):
        raise bad_request(f"Upload {record.id} is being completed or has ended", "upload_id")
    return upload_card(found(request, upload_id))


@router.get("/v1/uploads/{upload_id}")
async def retrieve_upload(upload_id: str, request: Request) -> dict:
    """Not in OpenAI's API (its client has no retrieve), but what a client polling one needs."""
    return card_of(request, found(request, upload_id))
