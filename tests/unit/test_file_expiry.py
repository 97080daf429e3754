"""Files with an expiration policy: invisible the moment it passes (retrieve, list, content,
quota), their rows and bytes deleted by the next sweep; files without one are kept."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from genserve.storage import files as files_module
from genserve.storage.db import open_database
from genserve.storage.files import FileQuota, FileStore, QuotaExceededError


def put(store: FileStore, data: bytes, expires_after_s: int | None = None, quota=None):  # noqa: ANN001, ANN201
    staged = store.stage(io.BytesIO(data), len(data))
    return store.commit(staged, "f", "user_data", quota=quota, expires_after_s=expires_after_s)


def test_an_expired_file_is_gone_then_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000]
    monkeypatch.setattr(files_module.time, "time", lambda: clock[0])
    store = FileStore(open_database(tmp_path), tmp_path / "files")
    brief = put(store, b"brief", expires_after_s=3600)
    kept = put(store, b"kept")
    assert brief.expires_at == 1_000_000 + 3600 and kept.expires_at is None
    clock[0] += 3599
    assert store.get(brief.id) is not None and store.delete_expired() == 0
    clock[0] += 1  # the expiry itself: gone
    assert store.get(brief.id) is None and store.get(kept.id) is not None
    assert [f.id for f in store.list(None, 10).data] == [kept.id]
    # An expired file no longer counts against the quota of two files.
    put(store, b"third", quota=FileQuota(max_files=2, max_bytes=100))
    with pytest.raises(QuotaExceededError):
        put(store, b"fourth", quota=FileQuota(max_files=2, max_bytes=100))
    assert store.path(brief.id).exists()  # bytes stay until the sweep
    assert not store.delete(brief.id)  # to DELETE /v1/files it is gone: 404, as GET says
    assert store.delete_expired() == 1
    assert not store.path(brief.id).exists() and store.path(kept.id).exists()
    assert store.delete_expired() == 0
