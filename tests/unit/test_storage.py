"""SQLite store: files written atomically, jobs as a compare-and-set state machine, pages."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from genserve.storage.db import open_database
from genserve.storage.files import FileStore, FileTooLargeError
from genserve.storage.jobs import ACTIVE, JobError, JobRecord, JobStore


@pytest.fixture()
def files(tmp_path: Path) -> FileStore:
    return FileStore(open_database(tmp_path), tmp_path / "files")


def upload(store: FileStore, data: bytes, purpose: str = "fine-tune"):
    return store.commit(store.stage(io.BytesIO(data), 1 << 20), "d.jsonl", purpose)


def test_upload_is_durable_and_survives_reopening(tmp_path: Path, files: FileStore) -> None:
    record = upload(files, b"abc\n")
    assert files.path(record.id).read_bytes() == b"abc\n"
    assert record.id.startswith("file-") and record.bytes == 4
    assert not list(files.root.glob("*.part"))  # the staging file became the file
    reopened = FileStore(open_database(tmp_path), tmp_path / "files")
    assert reopened.get(record.id) == record


def test_too_large_upload_leaves_nothing(files: FileStore) -> None:
    with pytest.raises(FileTooLargeError):
        files.stage(io.BytesIO(b"x" * 11), max_bytes=10)
    assert list(files.root.iterdir()) == []
    assert files.stage(io.BytesIO(b"x" * 10), max_bytes=10).bytes == 10


def test_sweep_removes_staged_leftovers(files: FileStore) -> None:
    files.stage(io.BytesIO(b"never committed"), 100)
    files.sweep()
    assert list(files.root.iterdir()) == []


def test_list_pages_and_delete(files: FileStore) -> None:
    ids = [upload(files, b"%d" % i, "fine-tune" if i % 2 else "batch").id for i in range(5)]
    page = files.list(None, limit=2)
    assert [r.id for r in page.data] == ids[::-1][:2] and page.has_more
    rest = files.list(None, limit=10, after=page.data[-1].id)
    assert [r.id for r in rest.data] == ids[::-1][2:] and not rest.has_more
    assert [r.id for r in files.list(None, 10, order="asc").data] == ids
    assert [r.id for r in files.list("fine-tune", 10).data] == [ids[3], ids[1]]
    assert files.delete(ids[0]) and not files.delete(ids[0])
    assert files.get(ids[0]) is None and not files.path(ids[0]).exists()


def job(jobs: JobStore, job_id: str) -> JobRecord:
    record = JobRecord(job_id, "m", "file-1", None, None, 7, {"n_epochs": "auto"}, created_at=1)
    return jobs.create(record)


def test_transitions_are_compare_and_set(tmp_path: Path) -> None:
    jobs = JobStore(open_database(tmp_path))
    job(jobs, "ftjob-1")
    assert jobs.transition("ftjob-1", "queued", ("validating_files",))
    assert jobs.transition("ftjob-1", "cancelled", ACTIVE)
    # The manager's "running -> failed" comes too late: cancel won.
    assert not jobs.transition("ftjob-1", "failed", ("running",), error=JobError("x", "y"))
    got = jobs.get("ftjob-1")
    assert got.status == "cancelled" and got.finished_at and got.error is None
    job(jobs, "ftjob-2")
    jobs.transition("ftjob-2", "failed", ACTIVE, error=JobError("bad", "broken", "training_file"))
    assert jobs.get("ftjob-2").error == JobError("bad", "broken", "training_file")


def test_events_checkpoints_and_adapters(tmp_path: Path) -> None:
    jobs = JobStore(open_database(tmp_path))
    job(jobs, "ftjob-1")
    for i in range(5):
        jobs.add_event("ftjob-1", f"e{i}", type="metrics", data={"step": i})
    first = jobs.events("ftjob-1", None, 2)
    assert [e.message for e in first.data] == ["e4", "e3"] and first.has_more
    rest = jobs.events("ftjob-1", first.data[-1].id, 10)
    assert [e.data["step"] for e in rest.data] == [2, 1, 0] and not rest.has_more
    jobs.add_checkpoint("ftjob-1", 10, 1, "/c/10", {"train_loss": 1.0})
    jobs.add_checkpoint("ftjob-1", 20, 2, "/c/20", {"train_loss": 0.5})
    assert jobs.last_checkpoint("ftjob-1").path == "/c/20"
    assert jobs.count_crash("ftjob-1") == 1 and jobs.count_crash("ftjob-1") == 2
    jobs.transition("ftjob-1", "succeeded", ACTIVE, fine_tuned_model="ft:m:x:ftjob-1")
    assert [j.id for j in jobs.served_adapters()] == ["ftjob-1"]
    assert jobs.mark_adapter_deleted("ft:m:x:ftjob-1")
    assert jobs.served_adapters() == []


def test_a_version_1_database_gains_result_files_and_keeps_its_jobs(tmp_path: Path) -> None:
    import sqlite3

    from genserve.storage import db as db_mod

    # A database as genserve wrote it before result_files existed (schema version 1).
    v1_schema = db_mod.SCHEMA.replace(",\n  result_files TEXT\n", "\n")
    assert v1_schema != db_mod.SCHEMA
    path = tmp_path / db_mod.DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(f"{v1_schema} PRAGMA user_version=1;")
    conn.execute(
        "INSERT INTO jobs (id, model, training_file, seed, hyperparameters, status, created_at)"
        " VALUES ('ftjob-old', 'm', 'file-x', 1, '{}', 'succeeded', 5)"
    )
    conn.commit()
    conn.close()

    jobs = JobStore(open_database(tmp_path))
    old = jobs.get("ftjob-old")
    assert old is not None and old.status == "succeeded" and old.result_files == ()
    jobs.create(JobRecord("ftjob-new", "m", "file-y", None, None, 1, {}, 6, status="running"))
    assert jobs.transition("ftjob-new", "succeeded", ("running",), result_files=("file-r",))
    assert jobs.get("ftjob-new").result_files == ("file-r",)
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == db_mod.SCHEMA_VERSION == 11  # through every migration since


# The files and jobs tables as genserve wrote them at schema version 2, before projects.
V2_FILES_AND_JOBS = """
CREATE TABLE files (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
  purpose TEXT NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,
  training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL,
  hyperparameters TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL, created_at INTEGER NOT NULL,
  finished_at INTEGER, fine_tuned_model TEXT, trained_tokens INTEGER, error TEXT,
  crashes INTEGER NOT NULL DEFAULT 0, adapter_deleted INTEGER NOT NULL DEFAULT 0,
  result_files TEXT
);
PRAGMA user_version=2;
"""


def test_a_version_2_database_gives_its_rows_to_the_default_project(tmp_path: Path) -> None:
    import sqlite3

    from genserve.storage import db as db_mod

    path = tmp_path / db_mod.DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(V2_FILES_AND_JOBS)
    conn.execute(
        "INSERT INTO files (id, filename, purpose, bytes, sha256, created_at)"
        " VALUES ('file-old', 'a.jsonl', 'fine-tune', 3, 'x', 5)"
    )
    conn.execute(
        "INSERT INTO jobs (id, model, training_file, seed, hyperparameters, status, created_at)"
        " VALUES ('ftjob-old', 'm', 'file-old', 1, '{}', 'queued', 5)"
    )
    conn.commit()
    conn.close()

    db = open_database(tmp_path)
    files, jobs = FileStore(db, tmp_path / "files"), JobStore(db)
    assert files.get("file-old").project == "default"
    assert files.get("file-old").expires_at is None  # (version 5's column) kept for good
    assert jobs.get("ftjob-old").project == "default"
    assert [f.id for f in files.list(None, 10, project="default").data] == ["file-old"]
    assert files.list(None, 10, project="key-a").data == []
    assert [j.id for j in jobs.list(None, 10, project="default").data] == ["ftjob-old"]
    assert jobs.count_active("default") == 1 and jobs.count_active("key-a") == 0
    # New rows keep their owner; the migration ran once and the version says so.
    jobs.create(JobRecord("ftjob-a", "m", "f", None, None, 1, {}, 6, project="key-a"))
    assert [j.id for j in jobs.list(None, 10, project="key-a").data] == ["ftjob-a"]
    db.close()
    reopened = JobStore(open_database(tmp_path))
    assert reopened.get("ftjob-a").project == "key-a"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 11


def test_files_are_scoped_to_their_project_and_within_quota(files: FileStore) -> None:
    from genserve.storage.files import FileQuota, QuotaExceededError

    def put(data: bytes, project: str, quota: FileQuota | None = None):  # noqa: ANN202
        return files.commit(files.stage(io.BytesIO(data), 1 << 20), "d", "batch", project, quota)

    a = put(b"aaaa", "key-a")
    put(b"bb", "key-b")
    assert [f.id for f in files.list(None, 10, project="key-a").data] == [a.id]
    assert files.list(None, 10, after=a.id, project="key-b").data == []  # a foreign cursor
    assert not files.delete(a.id, project="key-b") and files.get(a.id) is not None
    quota = FileQuota(max_files=2, max_bytes=10)
    with pytest.raises(QuotaExceededError, match="bytes"):
        put(b"x" * 7, "key-a", quota)  # 4 + 7 > 10
    put(b"x" * 6, "key-a", quota)
    with pytest.raises(QuotaExceededError, match="2 files"):
        put(b"x", "key-a", quota)
    put(b"x", "key-b", quota)  # another project's quota is its own
    assert sorted(p.name for p in files.root.iterdir()) == sorted(
        f.id for p in ("key-a", "key-b") for f in files.list(None, 10, project=p).data
    )  # refused uploads left no bytes behind


def test_a_version_4_database_gains_the_expiry_columns(tmp_path: Path) -> None:
    import sqlite3

    from genserve.storage import db as db_mod
    from genserve.storage.batches import BatchRecord, BatchStore

    v4 = db_mod.SCHEMA.replace(",\n  expires_at INTEGER\n", "\n")
    v4 = v4.replace(",\n  output_expires_s INTEGER\n", "\n")
    assert "expires_at INTEGER\n" not in v4 and "output_expires_s" not in v4
    path = tmp_path / db_mod.DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(f"{v4} PRAGMA user_version=4;")
    conn.execute(
        "INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status,"
        " created_at, expires_at) VALUES ('batch_old', 'default', '/v1/completions', 'file-x',"
        " '24h', 'in_progress', 5, 86405)"
    )
    conn.commit()
    conn.close()

    db = open_database(tmp_path)
    batches = BatchStore(db)
    assert batches.get("batch_old").output_expires_s is None
    new = BatchRecord(
        "batch_new", "default", "/v1/completions", "file-y", "24h", 6, 7, output_expires_s=3600
    )
    batches.create(new)
    assert batches.get("batch_new").output_expires_s == 3600
    staged = FileStore(db, tmp_path / "files")
    record = staged.commit(staged.stage(io.BytesIO(b"x"), 1), "x", "batch", expires_after_s=3600)
    assert staged.get(record.id).expires_at == record.created_at + 3600
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 11


def test_a_version_5_database_gains_the_job_method(tmp_path: Path) -> None:
    import sqlite3

    from genserve.storage import db as db_mod

    v5 = db_mod.SCHEMA.replace("\n  method TEXT NOT NULL DEFAULT 'supervised',", "")
    assert "method" not in v5
    path = tmp_path / db_mod.DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(f"{v5} PRAGMA user_version=5;")
    conn.execute(
        "INSERT INTO jobs (id, model, training_file, seed, hyperparameters, status, created_at)"
        " VALUES ('ftjob-old', 'm', 'file-x', 1, '{}', 'succeeded', 5)"
    )
    conn.commit()
    conn.close()

    jobs = JobStore(open_database(tmp_path))
    assert jobs.get("ftjob-old").method == "supervised"  # every job before DPO was
    jobs.create(JobRecord("ftjob-dpo", "m", "f", None, None, 1, {"beta": 0.1}, 6, method="dpo"))
    assert jobs.get("ftjob-dpo").method == "dpo"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 11


def test_a_version_6_database_keeps_its_stored_responses(tmp_path: Path) -> None:
    """Responses stored before background ones existed read as ended, synchronous ones; the
    restart sweep leaves them alone."""
    import json
    import sqlite3

    from genserve.storage import db as db_mod
    from genserve.storage.responses import ResponseStore

    v6 = db_mod.SCHEMA.replace(",\n  status TEXT,\n  background INTEGER NOT NULL DEFAULT 0", "")
    v6 = v6[: v6.index("-- A background response's stream events")]
    assert "background" not in v6 and "response_events" not in v6
    path = tmp_path / db_mod.DB_NAME
    conn = sqlite3.connect(path)
    conn.executescript(f"{v6} PRAGMA user_version=6;")
    body = {"id": "resp_old", "status": "completed", "output": []}
    conn.execute(
        "INSERT INTO responses (id, project, created_at, body, input_items, context)"
        " VALUES ('resp_old', 'default', 5, ?, '[]', '[]')",
        (json.dumps(body),),
    )
    conn.commit()
    conn.close()

    store = ResponseStore(open_database(tmp_path))
    old = store.get("resp_old", "default")
    assert old is not None and old.status == "completed" and not old.background
    assert store.fail_unfinished("restarted") == []
    assert store.events_after("resp_old", -1) == []
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 11
