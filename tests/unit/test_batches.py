"""The Batch API's runner without a model: line checks, results recorded once, resume after a
stop, cancel, retries while the engine is full (a fake handler answers the lines)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest

from genserve.runtime.batches import (
    BatchCall,
    BatchFinishedError,
    BatchReply,
    BatchRunner,
    parse_lines,
    result_line,
)
from genserve.storage.batches import BatchRecord, BatchStore, new_batch_id
from genserve.storage.db import open_database
from genserve.storage.files import FileStore

URL = "/v1/chat/completions"


def line(i: int, **over: object) -> dict:
    return {
        "custom_id": f"c{i}",
        "method": "POST",
        "url": URL,
        "body": {"model": "m", "i": i},
        **over,
    }


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in items).encode()


def test_parse_lines_names_every_bad_line() -> None:
    data = jsonl([line(1)]) + b"[1]\n\n" + jsonl([line(2, method="GET"), line(3, url="/x")])
    data += jsonl([line(4, body="text"), {"method": "POST"}, line(1)])
    lines, errors = parse_lines(data, URL)
    assert [x.custom_id for x in lines] == ["c1"]
    assert [(e.line, e.code) for e in errors] == [
        (2, "invalid_json_line"),
        (4, "invalid_method"),
        (5, "invalid_url"),
        (6, "missing_required_parameter"),
        (7, "missing_required_parameter"),
        (8, "duplicate_custom_id"),
    ]
    assert parse_lines(b"\n", URL)[1][0].code == "empty_file"


def raw_line(custom_id: str, content: str) -> str:
    """A line as text, so that its strings can hold JSON escapes json.dumps would not write."""
    body = f'{{"model": "m", "messages": [{{"role": "user", "content": "{content}"}}]}}'
    return f'{{"custom_id": "{custom_id}", "method": "POST", "url": "{URL}", "body": {body}}}'


def test_a_lone_surrogate_anywhere_in_a_line_fails_it_before_any_runs() -> None:
    """Such a string failed the whole batch in SQLite while it ran, losing what had finished."""
    texts = [raw_line("c1", "hi"), raw_line("\\ud800", "hi"), raw_line("c3", "\\udc00"),
             raw_line("c4", "\\ud83d\\ude00")]  # fmt: skip
    lines, errors = parse_lines("\n".join(texts).encode(), URL)
    assert [x.custom_id for x in lines] == ["c1", "c4"]  # an escaped pair is text
    assert [(e.line, e.code, e.param) for e in errors] == [
        (2, "invalid_json_line", "custom_id"),
        (3, "invalid_json_line", "body.messages.[0].content"),
    ]
    assert all("lone surrogate" in e.message for e in errors)


class Handler:
    """Answers each line with its index; line 3 is a 400; the first `full` calls say the
    engine is full; calls after the first `answer` hang (requests in flight)."""

    def __init__(self, full: int = 0, answer: int | None = None) -> None:
        self.calls: list[int] = []
        self.full = full
        self.answer = answer
        self.hang = asyncio.Event()

    async def __call__(self, call: BatchCall) -> BatchReply:
        await asyncio.sleep(0)  # an engine call always yields to the loop
        if self.full:
            self.full -= 1
            return BatchReply(429, {"error": {}}, retry=True)
        if self.answer is not None and len(self.calls) >= self.answer:
            await self.hang.wait()  # never set
        i = call.body["i"]
        self.calls.append(i)
        if i == 3:
            return BatchReply(400, {"error": {"message": "bad", "param": "temperature"}})
        return BatchReply(200, {"answer": i}, 2, 1)


def setup(tmp_path: Path, items: list[dict]) -> tuple[BatchStore, FileStore, BatchRecord]:
    db = open_database(tmp_path)
    files = FileStore(db, tmp_path / "files")
    data = jsonl(items)
    f = files.commit(files.stage(io.BytesIO(data), len(data)), "in.jsonl", "batch", "p")
    now = int(time.time())
    batch = BatchRecord(new_batch_id(), "p", URL, f.id, "24h", now, now + 3600)
    return BatchStore(db), files, batch


async def finished(store: BatchStore, batch_id: str) -> BatchRecord:
    for _ in range(500):
        b = store.get(batch_id)
        if b is not None and b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        await asyncio.sleep(0.01)
    raise AssertionError("batch did not finish")


def output_ids(files: FileStore, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    return [json.loads(x)["custom_id"] for x in files.path(file_id).read_text().splitlines()]


async def test_runs_every_line_once_and_splits_output_from_errors(tmp_path: Path) -> None:
    store, files, batch = setup(tmp_path, [line(i) for i in range(10)])
    handler = Handler(full=3)  # retried, never recorded
    runner = BatchRunner(store, files, handler, concurrency=3)
    runner.create(batch)
    done = await finished(store, batch.id)
    assert done.status == "completed" and done.total == 10 and done.model == "m"
    assert sorted(handler.calls) == list(range(10))
    assert output_ids(files, done.output_file_id) == [f"c{i}" for i in range(10) if i != 3]
    assert output_ids(files, done.error_file_id) == ["c3"]
    p = store.progress(batch.id)
    assert (p.completed, p.failed, p.input_tokens, p.output_tokens) == (9, 1, 18, 9)
    out = json.loads(files.path(done.output_file_id).read_text().splitlines()[0])
    assert out["response"]["status_code"] == 200 and out["response"]["body"] == {"answer": 0}


async def test_a_stopped_runner_resumes_without_running_a_line_twice(tmp_path: Path) -> None:
    store, files, batch = setup(tmp_path, [line(i) for i in range(12)])
    first = Handler(answer=4)  # then two requests hang in flight: the server "dies" there
    runner = BatchRunner(store, files, first, concurrency=2)
    runner.create(batch)
    while len(store.done_ids(batch.id)) < 4:
        await asyncio.sleep(0.005)
    await runner.stop()
    recorded = store.done_ids(batch.id)
    assert store.get(batch.id).status == "in_progress"

    second = Handler()
    await BatchRunner(store, files, second, concurrency=2).start()
    done = await finished(store, batch.id)
    assert done.status == "completed"
    assert not recorded & {f"c{i}" for i in second.calls}  # nothing recorded ran again
    ids = output_ids(files, done.output_file_id) + output_ids(files, done.error_file_id)
    assert sorted(ids) == sorted(f"c{i}" for i in range(12))


async def test_cancel_stops_new_requests_and_keeps_what_finished(tmp_path: Path) -> None:
    store, files, batch = setup(tmp_path, [line(i) for i in range(50)])
    handler = Handler(answer=2)
    runner = BatchRunner(store, files, handler, concurrency=2)
    runner.create(batch)
    while len(store.done_ids(batch.id)) < 2:
        await asyncio.sleep(0.005)
    assert runner.cancel(batch.id).status == "cancelling"
    done = await finished(store, batch.id)
    assert done.status == "cancelled"
    kept = output_ids(files, done.output_file_id) + output_ids(files, done.error_file_id)
    assert len(kept) == len(store.done_ids(batch.id)) == 2  # the hanging two were aborted
    with pytest.raises(BatchFinishedError):
        runner.cancel(batch.id)


async def test_a_malformed_file_fails_and_runs_nothing(tmp_path: Path) -> None:
    store, files, batch = setup(tmp_path, [line(1), line(1)])
    handler = Handler()
    BatchRunner(store, files, handler).create(batch)
    done = await finished(store, batch.id)
    assert done.status == "failed" and handler.calls == []
    assert [(e.line, e.code) for e in done.errors] == [(2, "duplicate_custom_id")]


async def test_a_batch_past_its_window_expires_with_what_finished(tmp_path: Path) -> None:
    store, files, batch = setup(tmp_path, [line(i) for i in range(3)])
    past = BatchRecord(batch.id, "p", URL, batch.input_file_id, "24h", 0, int(time.time()) - 1)
    handler = Handler()
    BatchRunner(store, files, handler).create(past)
    done = await finished(store, batch.id)
    assert done.status == "expired" and "expired_at" in done.times and handler.calls == []


def test_an_output_line_holds_no_character_a_reader_splits_lines_at() -> None:
    """A generated text with U+0085 (NEL) or U+2028 stays on its line: `.splitlines()`, which
    clients read a JSONL file with, split such a line in two (a live batch's output did)."""
    text = "a\x85b\u2028c\u2029d é \x1c"
    line = result_line("x", BatchReply(200, {"choices": [{"message": {"content": text}}]}))
    assert len(line.splitlines()) == 1
    assert json.loads(line)["response"]["body"]["choices"][0]["message"]["content"] == text
    assert "é" in line  # UTF-8 as it is otherwise
