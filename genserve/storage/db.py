"""The SQLite database under <data_dir>/genserve.db: one connection, one lock, one schema.

Calls are short (a row or a page of rows), so the event loop makes them directly; the lock
lets worker threads (uploads) share the connection. WAL with synchronous=FULL: a write that
returned survives a crash of the process or the machine.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "genserve.db"
SCHEMA_VERSION = 11
DEFAULT_PROJECT = "default"  # the owner of rows written before projects existed
# The columns a database of an older version lacks beyond SCHEMA's CREATE ... IF NOT EXISTS,
# by the version that brought them: (table, column, declaration). A column already there is
# skipped, so a half-known old schema migrates too.
MIGRATIONS: dict[int, tuple[tuple[str, str, str], ...]] = {
    2: (("jobs", "result_files", "TEXT"),),
    # Files and jobs belong to the project of the key that made them; older rows to `default`.
    3: (
        ("files", "project", f"TEXT NOT NULL DEFAULT '{DEFAULT_PROJECT}'"),
        ("jobs", "project", f"TEXT NOT NULL DEFAULT '{DEFAULT_PROJECT}'"),
    ),
    4: (),  # the batches and batch_results tables: new, so SCHEMA's CREATE makes them
    # OpenAI's expires_after on uploads, and a batch's output_expires_after for its files.
    5: (("files", "expires_at", "INTEGER"), ("batches", "output_expires_s", "INTEGER")),
    # A job's fine-tuning method (OpenAI's method.type); jobs from before DPO were supervised.
    6: (("jobs", "method", "TEXT NOT NULL DEFAULT 'supervised'"),),
    # Background responses: a response's status (NULL for one stored before: it had ended), and
    # whether it ran in the background. New tables need no column here (SCHEMA's CREATE makes
    # them): response_events (a background response's stream) and chat_completions (stored
    # chat completions).
    7: (
        ("responses", "status", "TEXT"),
        ("responses", "background", "INTEGER NOT NULL DEFAULT 0"),
    ),
    # Conversations: the conversations and conversation_items tables, new (SCHEMA's CREATE
    # makes them), so no column to add.
    8: (),
    # Uploads (OpenAI's Uploads API): the uploads and upload_parts tables, new.
    9: (),
    # Token usage per minute (storage/usage.py): the usage table, new.
    10: (),
    # Cancels asked of a background response that runs on another Ray replica: the
    # response_cancels table, new.
    11: (),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  filename TEXT NOT NULL,
  purpose TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  project TEXT NOT NULL DEFAULT 'default',
  expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  model TEXT NOT NULL,
  training_file TEXT NOT NULL,
  validation_file TEXT,
  suffix TEXT,
  seed INTEGER NOT NULL,
  hyperparameters TEXT NOT NULL,
  metadata TEXT,
  status TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  finished_at INTEGER,
  fine_tuned_model TEXT,
  trained_tokens INTEGER,
  error TEXT,
  crashes INTEGER NOT NULL DEFAULT 0,
  adapter_deleted INTEGER NOT NULL DEFAULT 0,
  project TEXT NOT NULL DEFAULT 'default',
  method TEXT NOT NULL DEFAULT 'supervised',
  result_files TEXT
);
CREATE TABLE IF NOT EXISTS job_events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  level TEXT NOT NULL,
  type TEXT NOT NULL,
  message TEXT NOT NULL,
  data TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS job_checkpoints (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  step INTEGER NOT NULL,
  epoch INTEGER NOT NULL,
  path TEXT NOT NULL,
  metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_checkpoints_by_job ON job_checkpoints (job_id, seq);
CREATE TABLE IF NOT EXISTS batches (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  project TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  input_file_id TEXT NOT NULL,
  completion_window TEXT NOT NULL,
  metadata TEXT,
  status TEXT NOT NULL,
  model TEXT,
  total INTEGER NOT NULL DEFAULT 0,
  errors TEXT,
  output_file_id TEXT,
  error_file_id TEXT,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  in_progress_at INTEGER,
  finalizing_at INTEGER,
  completed_at INTEGER,
  failed_at INTEGER,
  expired_at INTEGER,
  cancelling_at INTEGER,
  cancelled_at INTEGER,
  output_expires_s INTEGER
);
CREATE INDEX IF NOT EXISTS batches_by_project ON batches (project, seq);
-- One row per finished request: the primary key is what makes a custom_id appear once in the
-- output however often the server is killed and the batch resumed.
CREATE TABLE IF NOT EXISTS batch_results (
  batch_id TEXT NOT NULL,
  custom_id TEXT NOT NULL,
  line INTEGER NOT NULL,
  ok INTEGER NOT NULL,
  result TEXT NOT NULL,
  input_tokens INTEGER NOT NULL DEFAULT 0,
  output_tokens INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (batch_id, custom_id)
);
-- Stored Responses (storage/responses.py); a new table, so no column migration brings it.
CREATE TABLE IF NOT EXISTS responses (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  project TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  body TEXT NOT NULL,
  input_items TEXT NOT NULL,
  context TEXT NOT NULL,
  status TEXT,
  background INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS responses_by_project ON responses (project, seq);
-- Stored chat completions (storage/completions.py).
CREATE TABLE IF NOT EXISTS chat_completions (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  project TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  model TEXT NOT NULL,
  body TEXT NOT NULL,
  messages TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_completions_by_project ON chat_completions (project, seq);
-- A background response's stream events, kept so that a client can resume its stream (and
-- replay it once the response has ended); deleted with their response.
CREATE TABLE IF NOT EXISTS response_events (
  response_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  type TEXT NOT NULL,
  data TEXT NOT NULL,
  PRIMARY KEY (response_id, seq)
);
-- A cancel asked of a background response by a Ray replica that does not run it: the replica
-- that runs it reads this and stops it (storage/responses.py); deleted with its response.
CREATE TABLE IF NOT EXISTS response_cancels (
  response_id TEXT PRIMARY KEY
);
-- Conversations (storage/conversations.py): a conversation's items in the order they came (seq);
-- an item's id is unique within its conversation, as it is read and deleted by it.
CREATE TABLE IF NOT EXISTS conversations (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  project TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  conversation_id TEXT NOT NULL,
  id TEXT NOT NULL,
  item TEXT NOT NULL,
  UNIQUE (conversation_id, id)
);
CREATE INDEX IF NOT EXISTS conversation_items_in_order ON conversation_items (conversation_id, seq);
-- Uploads (storage/uploads.py): a file sent in parts; status pending, completing, completed or
-- cancelled (expired: pending past expires_at); file_id once it became a File.
CREATE TABLE IF NOT EXISTS uploads (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  project TEXT NOT NULL,
  filename TEXT NOT NULL,
  purpose TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  mime_type TEXT NOT NULL,
  status TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  file_id TEXT,
  file_expires_s INTEGER
);
CREATE TABLE IF NOT EXISTS upload_parts (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  upload_id TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_parts_of ON upload_parts (upload_id);
-- Token usage (storage/usage.py): one row per minute, kind, project, key ('' for a batch's
-- lines), model and batch flag, added to as requests end.
CREATE TABLE IF NOT EXISTS usage (
  minute INTEGER NOT NULL,
  kind TEXT NOT NULL,
  project TEXT NOT NULL,
  key_id TEXT NOT NULL,
  model TEXT NOT NULL,
  batch INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL,
  requests INTEGER NOT NULL,
  PRIMARY KEY (minute, kind, project, key_id, model, batch)
);
"""
# After the migrations: they may index columns an old database only has once migrated.
INDEXES = """
CREATE INDEX IF NOT EXISTS files_by_project ON files (project, seq);
CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs (project, seq);
CREATE INDEX IF NOT EXISTS responses_running ON responses (status)
  WHERE status IN ('queued', 'in_progress');
"""


def new_id(prefix: str) -> str:
    """OpenAI-style ids: `file-…`, `ftjob-…`, `ftevent-…`, `ftckpt-…` (96 random bits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer genserve (schema {version}); upgrade"
            )
        # A new database (version 0) gets every column from SCHEMA itself.
        steps = self._missing_columns(version) if version else ""
        # executescript commits any open transaction first, so the script brings its own.
        with self._lock:
            self._conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA} {steps} {INDEXES}"
                f" PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    def _missing_columns(self, version: int) -> str:
        """ALTERs for what the versions after `version` brought (its tables exist)."""
        steps = []
        for v, columns in sorted(MIGRATIONS.items()):
            for table, column, decl in columns if version < v else ():
                have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
                if have and column not in have:  # no table yet: SCHEMA's CREATE makes it whole
                    steps.append(f"ALTER TABLE {table} ADD COLUMN {column} {decl};")
        return "".join(steps)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """One atomic unit of writes: committed on exit, rolled back on an exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple = ()) -> int:
        """One write in its own transaction; returns the number of rows it changed."""
        with self.transaction() as cur:
            cur.execute(sql, args)
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_database(data_dir: Path) -> Database:
    return Database(data_dir / DB_NAME)
