"""A fine-tuning job's files checked while they are deleted: the job fails saying the file is
gone, never with the server's own path (a FileNotFoundError surfaced as `internal_error`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from genserve.storage.db import open_database
from genserve.storage.files import FileStore
from genserve.storage.jobs import JobRecord, JobStore
from genserve.training import dataset
from genserve.training.manager import JobManager, _FileProblem


class NoServing:
    models: dict = {}
    adapters: dict = {}

    async def register_adapter(self, spec) -> None:  # noqa: ANN001
        raise AssertionError("not reached")


def test_a_file_deleted_while_it_is_checked_is_gone_not_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_database(tmp_path)
    files = FileStore(db, tmp_path / "files")
    line = json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    )
    data = (line + "\n").encode()
    record = files.commit(files.stage(io.BytesIO(data), len(data)), "t.jsonl", "fine-tune")
    manager = JobManager(JobStore(db), files, NoServing(), tmp_path, threads=1)
    job = JobRecord("ftjob-1", "m", record.id, None, None, 1, {}, 0)
    assert manager._check_files(job).examples == 1  # present: checked
    check = dataset.check_file

    def deleted_meanwhile(path: Path) -> object:  # the bytes go after the record was read
        path.unlink()
        return check(path)

    monkeypatch.setattr(dataset, "check_file", deleted_meanwhile)
    with pytest.raises(_FileProblem) as caught:
        manager._check_files(job)
    assert str(caught.value) == f"file {record.id} no longer exists"
    assert caught.value.param == "training_file" and str(tmp_path) not in str(caught.value)
