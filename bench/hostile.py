"""The hostile requests of issue 13 for `load.py --hostile`: each is sent with key B, timed,
and its answer recorded (status, OpenAI error code), never raised.

Each attack is a coroutine returning `Outcome`s. A client timeout is recorded as a hang;
an answer the client never got (connection reset, server gone) as a `no answer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

MODEL = "genserve-starter"
MIB = 2**20


@dataclass(slots=True)
class Outcome:
    """One hostile request's answer; `status` None means no HTTP answer came."""

    kind: str
    status: int | None
    code: str
    seconds: float
    note: str = ""
    leaked: bool = False  # a success that must not be: another key's data, a model unloaded


@dataclass(frozen=True, slots=True)
class Attack:
    """A JSON request from key B: `body` is a dict, or raw bytes sent as they are."""

    kind: str
    path: str
    body: dict | bytes


def error_code(response: httpx.Response) -> str:
    """OpenAI's `error.code` (or `type`) of an answer, "" for a success or a foreign shape."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    return str(error.get("code") or error.get("type") or "")


async def timed(
    kind: str,
    send: Callable[[], Awaitable[httpx.Response]],
    timeout: float,
    judge: Callable[[httpx.Response], str] | None = None,
) -> Outcome:
    """Send, wait at most `timeout` seconds, and record what came back. `judge` names a leak
    in a success (another key's data in it), or returns ""."""
    start = time.perf_counter()
    try:
        response = await asyncio.wait_for(send(), timeout)
    except (TimeoutError, httpx.TimeoutException):
        return Outcome(kind, None, "timeout", timeout, f"no answer in {timeout:.0f} s")
    except (httpx.HTTPError, OSError) as e:
        return Outcome(kind, None, "no answer", time.perf_counter() - start, type(e).__name__)
    except Exception as e:  # noqa: BLE001 - the bench's own failure, reported in the row
        return Outcome(kind, None, "bench error", time.perf_counter() - start, repr(e))
    seconds = time.perf_counter() - start
    outcome = Outcome(kind, response.status_code, error_code(response), seconds, _message(response))
    if judge is not None and response.status_code < 300:
        outcome.note = judge(response)
        outcome.leaked = bool(outcome.note)
    return outcome


def _message(response: httpx.Response) -> str:
    if response.status_code < 400:
        return ""
    try:
        return str(response.json()["error"]["message"])[:70]
    except (ValueError, KeyError, TypeError):
        return response.text[:70]


async def send_attack(http: httpx.AsyncClient, attack: Attack, timeout: float) -> Outcome:
    if isinstance(attack.body, bytes):
        headers = {"content-type": "application/json"}

        def send() -> Awaitable[httpx.Response]:
            return http.post(attack.path, content=attack.body, headers=headers)
    else:

        def send() -> Awaitable[httpx.Response]:
            return http.post(attack.path, json=attack.body)

    return await timed(attack.kind, send, timeout)


def attacks(best_of_requests: int) -> list[Attack]:
    """The JSON attacks of issue 13, items 3, 4 and 9."""
    done = "/v1/completions"
    one = {"model": MODEL, "prompt": "x", "max_tokens": 16}
    listed = [
        *poisons(""),
        Attack("logit_bias 8192 x n=16", done, _logit_bias()),
        Attack("4 stop strings 20-40k", done, _long_stops()),
        Attack("3.9 MB prompt", done, {**one, "max_tokens": 1, "prompt": _big_prompt()}),
        Attack("anyOf 12 deep", done, {**one, "response_format": _schema(_any_of(12))}),
        Attack("lone surrogate (chat)", "/v1/chat/completions", _surrogate()),
        Attack("nested JSON 100k deep", "/v1/chat/completions", _deep_body(100_000)),
    ]
    best_of = {**one, "max_tokens": 64, "best_of": 16, "n": 1, "ignore_eos": True}
    listed += [Attack("best_of 16", done, best_of) for _ in range(best_of_requests)]
    return listed


def poisons(suffix: str) -> list[Attack]:
    """The two requests that failed every request of their engine step (issue 13, item 3)."""
    one = {"model": MODEL, "prompt": "x", "max_tokens": 16}
    return [
        # An integer: JSON's 1e30 is a float, which the schema refuses before it can harm.
        Attack(
            f"top_k 10**30{suffix}", "/v1/completions", {**one, "temperature": 1, "top_k": 10**30}
        ),
        Attack(
            f"regex (x{{1000}}){{1000}}{suffix}",
            "/v1/completions",
            {**one, "response_format": _schema(_REGEX)},
        ),
    ]


async def when(event: asyncio.Event, wait_s: float, send: Awaitable[Outcome]) -> Outcome:
    """Send once `event` is set: then the poison lands while the normal streams decode,
    whatever the other attacks did to their start."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), wait_s)
    return await send


_REGEX = {"type": "string", "pattern": "^(x{1000}){1000}$"}


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "hostile", "schema": schema}}


def _any_of(depth: int) -> dict:
    """Each level: an object holding the level below, or an array of it (2**depth leaves)."""
    node: dict = {"type": "string"}
    for _ in range(depth):
        node = {
            "anyOf": [
                {"type": "object", "properties": {"a": node}, "required": ["a"]},
                {"type": "array", "items": node},
            ]
        }
    return node


def _logit_bias() -> dict:
    bias = {str(i): 1 for i in range(8192)}
    return {"model": MODEL, "prompt": "x", "max_tokens": 30, "n": 16, "logit_bias": bias}


def _long_stops() -> dict:
    rng = random.Random(1)
    stops = ["".join(rng.choices("abcdefgh ", k=size)) for size in (20_000, 27_000, 33_000, 40_000)]
    return {"model": MODEL, "prompt": "x", "max_tokens": 480, "ignore_eos": True, "stop": stops}


def _big_prompt(size: int = 3_900_000) -> str:
    """Random short words: a tokenizer cannot lean on a cache of repeated words."""
    rng = random.Random(2)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=n)) for n in range(1, 8)]
    words += ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5)) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=size // 5))
    return text[:size]


def _surrogate() -> bytes:
    # json.dumps writes it as the escape \ud800: valid JSON, but no valid text (httpx's own
    # encoder would refuse to send it).
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 4}
    return json.dumps(body).encode()


def _deep_body(depth: int) -> bytes:
    head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})[:-1]
    return f'{head}, "x": {"[" * depth}{"]" * depth}}}'.encode()


async def cross_key_reads(b: httpx.AsyncClient, file_id: str | None, timeout: float):
    """B lists A's files, reads A's file card and downloads its bytes: each must be a miss."""
    if file_id is None:
        return [Outcome("cross-key reads", None, "skipped", 0.0, "key A's upload failed")]

    def listed(response: httpx.Response) -> str:
        return "A's file listed to B" if file_id in response.text else ""

    def read(response: httpx.Response) -> str:
        return "A's file read by B"

    path = f"/v1/files/{file_id}"
    return [
        await timed("cross-key list files", lambda: b.get("/v1/files"), timeout, listed),
        await timed("cross-key file card", lambda: b.get(path), timeout, read),
        await timed("cross-key file content", lambda: b.get(path + "/content"), timeout, read),
    ]


async def upload_as(http: httpx.AsyncClient, name: str) -> str | None:
    """Key A's file that B will try to read; None if the upload itself failed."""
    files = {"file": (name, b'{"tenant": "A"}\n', "application/jsonl")}
    try:
        response = await http.post("/v1/files", files=files, data={"purpose": "user_data"})
        return response.json()["id"] if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


async def member_delete(b: httpx.AsyncClient, timeout: float) -> Outcome:
    """Sent last: today a member key unloads the base model, which fails everything after it."""

    def unloaded(response: httpx.Response) -> str:
        return "BASE MODEL UNLOADED BY A MEMBER KEY"

    path = f"/v1/models/{MODEL}"
    return await timed("member DELETE base model", lambda: b.delete(path), timeout, unloaded)


async def health_probe(http: httpx.AsyncClient, timeout: float) -> Outcome:
    return await timed("/health during slowloris", lambda: http.get("/health"), timeout)


# Raw sockets: httpx sends a whole body before it reads the answer, and cannot half-send.


@dataclass(slots=True)
class Upload:
    """A chunked multipart upload as it goes: bytes written so far."""

    key: str
    total: int
    sent: int = 0


async def chunked_upload(port: int, upload: Upload, timeout: float) -> Outcome:
    """A multipart upload with no content-length, sent in chunks while watching for an early
    answer: the fixed server stops reading at its limit, today's reads everything first."""
    kind = f"chunked upload {upload.total / MIB:.0f} MiB"
    start = time.perf_counter()
    try:
        status, body = await asyncio.wait_for(_upload(port, upload), timeout)
    except TimeoutError:
        return Outcome(kind, None, "timeout", timeout, f"sent {upload.sent / MIB:.1f} MiB")
    except (OSError, EOFError) as e:  # EOFError: asyncio.IncompleteReadError
        return Outcome(kind, None, "no answer", time.perf_counter() - start, type(e).__name__)
    except Exception as e:  # noqa: BLE001 - the bench's own failure, reported in the row
        return Outcome(kind, None, "bench error", time.perf_counter() - start, repr(e))
    seconds = time.perf_counter() - start
    code = error_code(httpx.Response(status, content=body))
    note = f"{upload.sent / MIB:.1f} MiB sent before the answer"
    return Outcome(kind, status, code, seconds, note)


async def _upload(port: int, upload: Upload) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(_read_answer(reader))
    try:
        # The server may close once it has answered; the answer is what counts.
        with contextlib.suppress(OSError):
            await _send_chunks(writer, upload, answer)
        return await answer
    finally:
        answer.cancel()
        writer.close()


async def _send_chunks(writer: asyncio.StreamWriter, upload: Upload, answer: asyncio.Task):
    boundary = "genserve-bench-boundary"
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {upload.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode())
    first = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    await _chunk(writer, first.encode())
    block = b'{"x": 1}\n' * 7282  # ~64 KiB of valid JSONL
    while upload.sent < upload.total and not answer.done():
        await _chunk(writer, block)
        upload.sent += len(block)
    if not answer.done():
        await _chunk(writer, f"\r\n--{boundary}--\r\n".encode())
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length) if length else b""


@dataclass(slots=True)
class Slowloris:
    """Half-sent requests held open: headers begun, a byte now and then, never finished."""

    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    refused: int
    trickled: int = 0


async def open_slowloris(port: int, count: int) -> Slowloris:
    tried = await asyncio.gather(
        *[_half_request(port) for _ in range(count)], return_exceptions=True
    )
    conns = [c for c in tried if isinstance(c, tuple)]
    return Slowloris(conns=conns, refused=count - len(conns))


async def _half_request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
    await writer.drain()
    return reader, writer


async def trickle(loris: Slowloris, every_s: float = 5.0) -> None:
    """One more header byte per socket every few seconds, until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        for _, writer in loris.conns:
            if not writer.is_closing():
                writer.write(b"a")
        loris.trickled += 1


def close_slowloris(loris: Slowloris, held_s: float) -> Outcome:
    """Drop them all; the row says how many the server had already closed."""
    closed = sum(1 for reader, _ in loris.conns if reader.at_eof())
    for _, writer in loris.conns:
        writer.close()
    note = (
        f"{len(loris.conns)} opened ({loris.refused} refused), "
        f"{closed} closed by the server, held {held_s:.0f} s"
    )
    return Outcome(f"slowloris x{len(loris.conns) + loris.refused}", None, "held", held_s, note)
