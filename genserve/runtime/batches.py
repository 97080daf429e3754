"""The Batch API's runner: validate a file of requests, run them at background priority,
record each result as it finishes, resume after a restart, write the output and error files.

validating -> in_progress -> finalizing -> completed; failed (a malformed file: nothing runs);
cancelling -> cancelled; expired (past the completion window). The database is the truth: a
batch found active at start-up is picked up where it was, and a request whose custom_id has a
result is never run again (genserve.storage.batches keeps one result per custom_id).

Requests run in this process through the same code as online ones: the API layer hands the
runner a BatchHandler (genserve.api.batches) that validates a body with the online request
schema and calls runtime.generation's generate()/collect(), with Request.priority BACKGROUND so
the engine's scheduler lets interactive calls go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from genserve.runtime.json_text import field_name, lone_surrogate_at
from genserve.storage.batches import (
    ACTIVE,
    BatchRecord,
    BatchResult,
    BatchStore,
    LineError,
)
from genserve.storage.files import FileStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a batch may target (the API layer's handler has a route for each: api/batches.py).
ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_REPORTED_ERRORS = 100  # of a malformed file's lines, the first ones named
CONCURRENCY = 8  # requests of one batch in flight at once
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0  # backoff while the engine is full, loading, stopping
OUTPUT_PURPOSE = "batch_output"


# -- what crosses to the API layer ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchCall:
    """One request of a batch, as its handler gets it."""

    endpoint: str
    body: dict[str, Any]
    project: str  # the batch's: it sees that project's models only


@dataclass(frozen=True, slots=True)
class BatchReply:
    """What an online call would have answered; `retry`: nothing to record, run it again later
    (the engine was full, the model loading, the server stopping)."""

    status_code: int
    body: dict[str, Any]
    input_tokens: int = 0
    output_tokens: int = 0
    retry: bool = False


BatchHandler = Callable[[BatchCall], Awaitable[BatchReply]]


class BatchFinishedError(ValueError):
    """The batch has already ended (or is finishing); there is nothing left to cancel."""


# -- the input file ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int  # 1-based, as errors name it
    custom_id: str
    body: dict[str, Any]


def _check_line(n: int, text: str, endpoint: str) -> BatchLine | LineError:
    try:
        item = json.loads(text)
    except ValueError as e:
        return LineError("invalid_json_line", f"line {n} is not valid JSON: {e}", n)
    if not isinstance(item, dict):
        return LineError("invalid_json_line", f"line {n} must be a JSON object", n)
    if (at := lone_surrogate_at(item)) is not None:  # it failed the whole batch in SQLite
        where = field_name(at)
        msg = f"line {n}: `{where}` holds a lone surrogate (an unpaired \\u escape), not text"
        return LineError("invalid_json_line", msg, n, where)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        msg = f"line {n}: `custom_id` must be a non-empty string"
        return LineError("missing_required_parameter", msg, n, "custom_id")
    if item.get("method") != "POST":
        return LineError("invalid_method", f"line {n}: `method` must be POST", n, "method")
    if item.get("url") != endpoint:
        msg = f"line {n}: `url` is {item.get('url')!r}; this batch's endpoint is {endpoint}"
        return LineError("invalid_url", msg, n, "url")
    if not isinstance(item.get("body"), dict):
        msg = f"line {n}: `body` must be a JSON object"
        return LineError("missing_required_parameter", msg, n, "body")
    return BatchLine(n, custom_id, item["body"])


def parse_lines(data: bytes, endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
    """Every request of the file, or what is wrong with it (the first MAX_REPORTED_ERRORS)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [LineError("invalid_file_format", f"the file is not UTF-8: {e}")]
    lines, errors, seen = [], [], set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) are not requests
        parsed = _check_line(n, raw, endpoint)
        if isinstance(parsed, BatchLine) and parsed.custom_id in seen:
            msg = f"line {n}: custom_id {parsed.custom_id!r} is used by an earlier line"
            parsed = LineError("duplicate_custom_id", msg, n, "custom_id")
        if isinstance(parsed, LineError):
            errors.append(parsed)
        else:
            seen.add(parsed.custom_id)
            lines.append(parsed)
    if not lines and not errors:
        errors.append(LineError("empty_file", "the input file holds no requests"))
    if len(lines) > MAX_LINES:
        errors.append(LineError("too_many_requests", f"a batch takes at most {MAX_LINES} lines"))
    return lines, errors[:MAX_REPORTED_ERRORS]


def first_model(lines: list[BatchLine]) -> str | None:
    model = lines[0].body.get("model") if lines else None
    return model if isinstance(model, str) else None


def result_line(custom_id: str, reply: BatchReply) -> str:
    """OpenAI's per-line shape, the same for the output and the error file."""
    response = {
        "status_code": reply.status_code,
        "request_id": secrets.token_hex(12),
        "body": reply.body,
    }
    record = {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": response,
        "error": None,
    }
    return jsonl_line(record)


# Characters that str.splitlines() (and some JSONL readers) take as line breaks and that JSON
# lets a string hold raw (the others are control characters json escapes): a generated text's
# U+0085 split an output line in two for a client reading `.text.splitlines()`. Escaped, each
# line stays one line.
LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def jsonl_line(record: dict) -> str:
    """One JSONL line: UTF-8 as it is, but no character any reader splits lines at."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKS)


# -- the runner -------------------------------------------------------------------------------
class BatchRunner:
    """Owns the active batches' tasks on the server's event loop; the only writer of batches."""

    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        handler: BatchHandler,
        concurrency: int = CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.store = store
        self.files = files
        self.handler = handler
        self.concurrency = concurrency
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        # One thread of its own writes results and files (each commit fsyncs): on the shared
        # default pool, slow commits would hold the threads interactive calls tokenize on.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer")

    async def _write_off_loop(self, fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def start(self) -> None:
        """Resume every batch a previous run left active."""
        for batch in self.store.with_status(*ACTIVE):
            log.info("resuming batch %s (%s)", batch.id, batch.status)
            self._launch(batch.id)

    async def stop(self) -> None:
        """Stop every batch where it is (what finished is recorded; the rest runs after a
        restart). Before the engines stop, so no request fails for their shutdown."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._writer.shutdown(wait=True)  # a commit under way completes

    def create(self, batch: BatchRecord) -> BatchRecord:
        self._hold_input(batch)
        self.store.create(batch)
        self._launch(batch.id)
        return batch

    def _held_input(self, batch_id: str) -> Path:
        return self.files.root.parent / "batch-inputs" / f"{batch_id}.jsonl"

    def _hold_input(self, batch: BatchRecord) -> None:
        """The batch's own hard link to its input, read again on a resume: the upload may be
        deleted while the batch runs (without it, a restart then failed the batch and lost
        what had finished)."""
        with contextlib.suppress(FileNotFoundError):  # deleted already: _lines says so
            self.files.hold(batch.input_file_id, self._held_input(batch.id))

    def _release_input(self, batch_id: str) -> None:
        """Once the batch has ended (not when the server stops: it resumes from the link)."""
        current = self.store.get(batch_id)
        if current is not None and current.status not in ACTIVE:
            self._held_input(batch_id).unlink(missing_ok=True)

    def cancel(self, batch_id: str) -> BatchRecord:
        """Stop starting requests now; the task aborts those in flight and writes the files."""
        if not self.store.transition(batch_id, "cancelling", ("validating", "in_progress")):
            batch = self.store.get(batch_id)
            if batch is not None and batch.status == "cancelling":
                return batch
            raise BatchFinishedError(
                f"batch {batch_id} has already ended ({batch and batch.status})"
            )
        event = self._cancel.get(batch_id)
        if event is not None:
            event.set()
        if batch_id not in self._tasks:  # no task (stopping): the next start finishes it
            log.info("batch %s cancelled while no task runs it", batch_id)
        batch = self.store.get(batch_id)
        assert batch is not None
        return batch

    def _launch(self, batch_id: str) -> None:
        self._cancel[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._guarded(batch_id), name=f"batch {batch_id}")
        self._tasks[batch_id] = task

    async def _guarded(self, batch_id: str) -> None:
        try:
            await self._run(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the batch fails, the server goes on
            log.exception("batch %s failed", batch_id)
            error = LineError("internal_error", f"the batch stopped on an internal error: {e}")
            self.store.transition(batch_id, "failed", ACTIVE, errors=(error,))
        finally:
            self._tasks.pop(batch_id, None)
            self._cancel.pop(batch_id, None)
            self._release_input(batch_id)

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        assert batch is not None
        if batch.status in ("validating", "in_progress"):
            lines = await self._lines(batch)
            if lines is None:
                return  # failed validation
            outcome = await self._work(self.store.get(batch_id) or batch, lines)
            if outcome == "expired":
                await self._finalize(batch_id, "expired", ("in_progress",))
                return
        # Cancelled (now or before a restart), or every request done.
        if self.store.transition(batch_id, "finalizing", ("in_progress",)):
            await self._finalize(batch_id, "completed", ("finalizing",))
        else:
            current = self.store.get(batch_id)
            final = "cancelled" if current and current.status == "cancelling" else "completed"
            await self._finalize(batch_id, final, ("cancelling", "finalizing"))

    async def _lines(self, batch: BatchRecord) -> list[BatchLine] | None:
        """Parse the input (again, on a resume); a malformed or deleted file fails the batch."""
        held = self._held_input(batch.id)  # absent for a batch created before links were kept
        path = held if held.exists() else self.files.path(batch.input_file_id)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            data, errors = None, [LineError("file_not_found", "the input file was deleted")]
        if data is not None:
            lines, errors = await asyncio.to_thread(parse_lines, data, batch.endpoint)
        if errors:
            active = ("validating", "in_progress", "cancelling")
            self.store.transition(batch.id, "failed", active, errors=errors)
            return None
        if batch.status == "validating":
            # From validating only: a batch cancelled meanwhile stays cancelling.
            self.store.transition(
                batch.id, "in_progress", ("validating",), total=len(lines), model=first_model(lines)
            )
        return lines

    async def _work(self, batch: BatchRecord, lines: list[BatchLine]) -> str:
        """Run what has no result yet until done, cancelled or expired; what stopped it."""
        if batch.status != "in_progress":
            return "cancelled"
        done = self.store.done_ids(batch.id)
        todo = iter([ln for ln in lines if ln.custom_id not in done])
        stop = self._cancel.setdefault(batch.id, asyncio.Event())
        n = min(self.concurrency, len(lines) - len(done))
        workers = [asyncio.create_task(self._worker(batch, todo)) for _ in range(n)]
        if not workers:
            return "done"
        stopper = asyncio.create_task(stop.wait())
        everything = asyncio.gather(*workers)
        try:
            await asyncio.wait({everything, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not everything.done():
                everything.cancel()  # cancel or server stop: in-flight requests are aborted
                with contextlib.suppress(asyncio.CancelledError):
                    await everything
        if stop.is_set():
            return "cancelled"
        everything.result()  # a worker's error fails the batch (see _guarded)
        finished = len(self.store.done_ids(batch.id)) >= len(lines)
        return "done" if finished else "expired"  # workers stop early only past the window

    async def _worker(self, batch: BatchRecord, todo: Iterator[BatchLine]) -> None:
        for line in todo:  # shared: each line is taken by one worker
            reply = await self._call(batch, line)
            if reply is None:
                return  # past the completion window: the batch expires
            result = BatchResult(
                line.custom_id, line.line, reply.status_code == 200,
                result_line(line.custom_id, reply), reply.input_tokens, reply.output_tokens,
            )  # fmt: skip
            # Committed (fsync) off the event loop: interactive streams share that loop.
            await self._write_off_loop(self.store.add_result, batch.id, result)

    async def _call(self, batch: BatchRecord, line: BatchLine) -> BatchReply | None:
        """The line's reply; None once the batch's window has passed (nothing recorded)."""
        call = BatchCall(batch.endpoint, line.body, batch.project)
        wait = RETRY_FIRST_S
        while time.time() < batch.expires_at:
            try:
                reply = await self.handler(call)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one request fails, the batch goes on
                log.exception("batch %s line %d failed", batch.id, line.line)
                body = {"error": {"message": f"internal error: {e}", "type": "server_error",
                                  "param": None, "code": None}}  # fmt: skip
                return BatchReply(500, body)
            if not reply.retry:
                return reply
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX_S)
        return None

    async def _finalize(self, batch_id: str, final: str, allowed_from: tuple[str, ...]) -> None:
        """Write the output and error files from the recorded results and end the batch."""
        batch = self.store.get(batch_id)
        assert batch is not None
        output = await self._write(batch, self.store.results(batch_id, ok=True), "output")
        errors = await self._write(batch, self.store.results(batch_id, ok=False), "error")
        self.store.transition(
            batch_id, final, allowed_from, output_file_id=output, error_file_id=errors
        )

    async def _write(self, batch: BatchRecord, lines: list[str], kind: str) -> str | None:
        if not lines:
            return None
        data = ("\n".join(lines) + "\n").encode()
        name = f"{batch.id}_{kind}.jsonl"

        def store() -> str:
            staged = self.files.stage(io.BytesIO(data), max_bytes=len(data))
            try:
                expiry = batch.output_expires_s
                record = self.files.commit(
                    staged, name, OUTPUT_PURPOSE, batch.project, expires_after_s=expiry
                )
                return record.id
            finally:
                self.files.discard(staged)

        return await self._write_off_loop(store)
