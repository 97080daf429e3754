"""A hostile client against a live server (issue 13): model refs that leave the models
directory, oversize and malformed uploads, half-sent requests (slowloris), forged log lines,
undecodable headers and prompts, and the keys in a training worker's environment.

One server for the module, configured through GENSERVE_* variables where the test is that
they are honoured, started in a working directory that holds a model of its own.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server, wait_until

KEY = "sk-edge-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_FILE = 2 * 2**20  # GENSERVE_MAX_FILE_BYTES of this module's server
MAX_CONNECTIONS = 16
HEADER_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def edge(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    root = tmp_path_factory.mktemp("edge")
    shutil.copytree(tiny_model_dir, root / "cwd" / "outside" / "evil")
    (root / "models").mkdir()
    (root / "models" / "escape").symlink_to(root / "cwd" / "outside" / "evil")
    (root / "tmp").mkdir()
    env = {
        "GENSERVE_ADMIN_KEYS": KEY,  # registering models (item 5) needs an admin key
        "GENSERVE_MAX_FILE_BYTES": str(MAX_FILE),
        "GENSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "TMPDIR": str(root / "tmp"),  # where upload spools go: the test looks for leftovers
    }
    args = ("--models-dir", str(root / "models"), "--header-timeout", str(HEADER_TIMEOUT_S))
    srv = start_server(tiny_model_dir, root, *args, "--max-model-len", "128", env=env,
                       cwd=root / "cwd")  # fmt: skip
    srv.root = root  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture()
def api(edge: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.url + "/v1", api_key=KEY, max_retries=0)


def post(edge: LiveServer, path: str, **kw) -> httpx.Response:  # noqa: ANN003
    return httpx.post(edge.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)


# --- model refs (item 5) -------------------------------------------------------------------


def test_model_refs_resolve_inside_the_models_dir_only(edge: LiveServer) -> None:
    # `outside/evil` is a model folder in the server's working directory: it was loaded.
    r = post(edge, "/v1/models", json={"model": "outside/evil"})
    assert r.status_code == 400, r.text  # neither in the models dir nor (offline) on the hub
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == "model"
    r = post(edge, "/v1/models", json={"model": "escape"})  # a symlink out of the models dir
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path", r.text
    ids = [m["id"] for m in httpx.get(edge.url + "/v1/models", headers=AUTH).json()["data"]]
    assert "evil" not in ids and "escape" not in ids


# --- uploads (item 6) ----------------------------------------------------------------------


def chat_line(i: int) -> bytes:
    messages = [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]
    return json.dumps({"messages": messages}).encode() + b"\n"


def test_env_file_limit_is_honoured(api: openai.OpenAI) -> None:
    body = chat_line(1) * (MAX_FILE // len(chat_line(1)) + 1)  # the default limit is 512 MiB
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("big.jsonl", body), purpose="fine-tune")
    assert (err.value.body["param"], err.value.body["code"]) == ("file", "file_too_large")
    assert str(MAX_FILE) in err.value.body["message"]


def _chunked_upload_head(port: int) -> bytes:
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    part = (
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n"


def _send_until_answered(sock: socket.socket, total: int) -> tuple[int, bytes]:
    """Send `total` bytes of chunked body, stopping when the server answers or resets."""
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break  # the answer is there: stop sending, as a client would
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    reply = b""
    try:
        while data := sock.recv(65536):
            reply += data
    except (ConnectionResetError, TimeoutError):
        pass
    return sent, reply


def _fds_under(pid: int, folder: Path) -> list[str]:
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue
    return [t for t in targets if t.startswith(str(folder))]


def test_chunked_upload_is_stopped_at_the_limit(edge: LiveServer) -> None:
    total = 32 * 2**20  # no content-length: today all of it was read before the 400
    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(_chunked_upload_head(edge.port))
        sent, reply = _send_until_answered(sock, total)
    assert sent < total // 2, f"sent {sent} bytes before the server answered"
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply[:300]
    error = json.loads(body)["error"]
    assert (error["param"], error["code"]) == ("file", "file_too_large")
    data = Path(edge.root) / f"data-{edge.port}" / "files"  # type: ignore[attr-defined]
    assert not list(data.glob(".*.part"))  # the staging file never outlives the request
    spool = Path(edge.root) / "tmp"  # type: ignore[attr-defined]
    wait_until(lambda: not _fds_under(edge.proc.pid, spool), timeout=10)
    assert httpx.get(edge.url + "/health").status_code == 200


def test_oversize_upload_sent_whole_still_reads_its_400(edge: LiveServer) -> None:
    """A client that sends its whole body before reading (as most do) gets the 400, not a
    reset: the server answers at the limit, then reads and drops the rest before closing."""
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as sock:
        sock.sendall(_chunked_upload_head(edge.port))
        for _ in range(12 * MAX_FILE // len(chunk)):  # 24 MiB: 12 times the limit
            sock.sendall(frame)  # a reset here is the failure this test is about
        end = b"\r\n--XyZ--\r\n"
        sock.sendall(f"{len(end):x}\r\n".encode() + end + b"\r\n0\r\n\r\n")
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply[:300]
    assert json.loads(body)["error"]["code"] == "file_too_large"


GOOD = chat_line(1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"prompt": "' + b"x" * 2**20 + b'", "completion": "y"}\n', "longer than"),
        (b"[" + b"[]," * 330_000 + b"[]]\n", "more than 100000"),
        (b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n", "nested too deeply"),
        (b'{"prompt": "a\\ud800", "completion": "b"}\n', "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": "\\udc00"}]}\n', "lone surrogate"),
    ],
    ids=["long-line", "many-lists", "deep", "surrogate-prompt", "surrogate-content"],
)
def test_hostile_jsonl_lines_are_400_naming_the_line(
    api: openai.OpenAI, line: bytes, expected: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("t.jsonl", GOOD + line + GOOD), purpose="fine-tune")
    assert_valid(err.value.response.json(), "ErrorResponse")
    assert err.value.body["param"] == "file"
    assert "line 2:" in err.value.body["message"] and expected in err.value.body["message"]


# --- connections (item 7) ------------------------------------------------------------------


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never more
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""  # nothing was asked: the server's only word is EOF
    except ConnectionResetError:
        return True


def test_slowloris_neither_blocks_others_nor_stays(edge: LiveServer, api: openai.OpenAI) -> None:
    sockets = [_half_sent(edge.port) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        assert httpx.get(edge.url + "/health", timeout=10).status_code == 200
        done = api.completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
        assert done.choices[0].text is not None
        # Beyond the cap the oldest were closed at once; the rest when their deadline passed.
        assert all(_closed_by_server(s) for s in sockets)
    finally:
        for s in sockets:
            s.close()


def _busy(port: int) -> socket.socket:
    """A connection inside a request: an upload whose body the server waits for."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    assert b"100 Continue" in sock.recv(1024)  # the route reads its body: the request runs
    return sock


def test_beyond_the_cap_with_every_connection_busy_is_503(edge: LiveServer) -> None:
    busy: list[socket.socket] = []
    try:
        busy += [_busy(edge.port) for _ in range(MAX_CONNECTIONS)]  # idle ones make room
        r = httpx.get(edge.url + "/health", timeout=10)
        assert r.status_code == 503, r.text
        assert_valid(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "too_many_connections"
    finally:
        for s in busy:
            s.close()
    wait_until(lambda: _healthy(edge), 30)


def test_headers_over_the_limit_are_431_even_in_one_read(edge: LiveServer) -> None:
    """--max-header-bytes (64 KiB here) holds for headers that arrive in one packet too (they
    were parsed and answered before being counted); a body after them is not counted."""
    for size in (70_000, 200_000):
        sock = socket.create_connection(("127.0.0.1", edge.port), timeout=30)
        with sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * size}\r\n\r\n".encode())
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 431"), head[:200]
        assert b"headers_too_large" in head
    r = httpx.get(edge.url + "/health", headers={"x-pad": "a" * 60_000}, timeout=30)
    assert r.status_code == 200, r.text
    big_body = {"model": "tiny-llama", "prompt": "a", "max_tokens": 1, "user": "u" * 100_000}
    assert post(edge, "/v1/completions", json=big_body).status_code == 200


def _healthy(edge: LiveServer) -> bool:
    try:
        return httpx.get(edge.url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


# --- smaller items (9) ---------------------------------------------------------------------


def test_a_path_cannot_forge_a_log_line(edge: LiveServer) -> None:
    forged = "2026-01-01 00:00:00,000 INFO genserve.access: DELETE /v1/files/all 200"
    httpx.get(edge.url + "/v1/x%0a" + forged.replace(" ", "%20"))  # no key: 401, and logged
    wait_until(lambda: "/v1/x\\n2026-01-01" in edge.log(), timeout=10)
    assert not any(line.startswith(forged) for line in edge.log().splitlines())


def test_a_header_that_is_not_utf8_is_400(edge: LiveServer) -> None:
    tracebacks = edge.log().count("Traceback")
    for name in ("x-thing", "authorization"):
        r = httpx.get(edge.url + "/v1/models", headers={**AUTH, name: b"Bearer \xff\xfe"})
        assert r.status_code == 400, r.text
        assert_valid(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "invalid_header"
    assert edge.log().count("Traceback") == tracebacks


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "a\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.[0].content",
        ),
        # Each of these answered 500 (a bad-input sweep): the id echoed in the 404, tool
        # arguments and descriptions at the tokenizer, metadata in the response's JSON, an id
        # looked up in SQLite, a key.
        ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
        (
            "/v1/chat/completions",
            '{"model": "tiny-llama", "messages": [{"role": "assistant", "content": null,'
            ' "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f",'
            ' "arguments": "\\ud800"}}]}]}',
            "messages.[0].tool_calls.[0].function.arguments",
        ),
        (
            "/v1/responses",
            '{"model": "tiny-llama", "input": "hi", "metadata": {"a": "x\\udfff"}}',
            "metadata.a",
        ),
        (
            "/v1/responses",
            '{"model": "tiny-llama", "input": "hi", "previous_response_id": "\\ud800"}',
            "previous_response_id",
        ),
        ("/tokenize", '{"model": "tiny-llama", "prompt": "\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tools":'
            ' [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",'
            ' "properties": {"\\ud800": {"type": "string"}}}}}]}',
            "tools.[0].function.parameters.properties.\\ud800",
        ),
    ],
    ids=[
        "completion",
        "chat",
        "model",
        "tool-arguments",
        "metadata",
        "previous-id",
        "tokenize",
        "key",
    ],  # fmt: skip
)
def test_a_lone_surrogate_anywhere_in_a_body_is_400(
    edge: LiveServer, path: str, body: str, param: str
) -> None:
    r = post(edge, path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param
    assert "lone surrogate" in r.json()["error"]["message"]


def test_a_surrogate_pair_is_text_and_is_answered(edge: LiveServer) -> None:
    """An escaped pair (an emoji, as json.dumps writes it by default) is text, not refused."""
    body = '{"model": "tiny-llama", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = post(
        edge, "/v1/completions", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 2


def test_the_training_worker_gets_no_api_keys(api: openai.OpenAI, edge: LiveServer) -> None:
    data = b"".join(chat_line(i) for i in range(20))
    file_id = api.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    hyper = {"n_epochs": 50, "batch_size": 1}  # long enough to be seen running
    method = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    job = api.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id, method=method)
    url = f"{edge.url}/v1/fine_tuning/jobs/{job.id}"
    try:
        pid = wait_until(lambda: httpx.get(url, headers=AUTH).json()["x_genserve_worker_pid"])
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"GENSERVE_MAX_FILE_BYTES" in environ  # the right process, with the server's env
        assert b"GENSERVE_ADMIN_KEYS" not in environ and KEY.encode() not in environ
    finally:
        api.fine_tuning.jobs.cancel(job.id)


def command_line(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # exited since it was listed
        return ""


def test_no_child_process_gets_api_keys(edge: LiveServer) -> None:
    """The engine process, the grammar helper and whatever else the server started: none has
    the server's keys in its environment (multiprocessing passes on the parent's whole)."""

    def helper_ready() -> dict | None:
        health = httpx.get(edge.url + "/health").json()
        return health if health["models"]["tiny-llama"]["grammar"] == "ready" else None

    engine_pid = wait_until(helper_ready)["models"]["tiny-llama"]["engine_pid"]
    children = psutil.Process(edge.proc.pid).children(recursive=True)
    spawned = [c.pid for c in children if "spawn_main" in command_line(c)]
    assert engine_pid in spawned and len(spawned) >= 2, spawned  # the engine, the helper
    for child in children:
        try:
            environ = Path(f"/proc/{child.pid}/environ").read_bytes()
        except FileNotFoundError:  # a short-lived one (a compiler) that has exited since
            continue
        assert b"GENSERVE_MAX_FILE_BYTES" in environ, child  # the server's env, inherited
        assert b"GENSERVE_ADMIN_KEYS" not in environ and KEY.encode() not in environ, child


def memory_holds(pid: int, needle: bytes, chunk: int = 16 << 20) -> bool:
    """Whether `needle` is anywhere in a process's writable memory (heap, stacks, anonymous
    maps), read through /proc/<pid>/mem (this process is its ancestor)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            for at in range(start, end, chunk):  # chunks overlap by the needle's length
                try:
                    mem.seek(at)
                    data = mem.read(min(chunk + len(needle), end - at))
                except OSError:  # a guard page, or a map gone since
                    break
                if needle in data:
                    return True
    return False


def test_the_engine_process_holds_no_api_key(edge: LiveServer) -> None:
    """The config sent to the engine process carries the keys hashed: their plaintext is
    nowhere in its memory (with the same test, the server's own holds it: the check works)."""
    health = httpx.get(edge.url + "/health").json()
    assert memory_holds(edge.proc.pid, KEY.encode())
    assert not memory_holds(health["models"]["tiny-llama"]["engine_pid"], KEY.encode())


def test_a_body_that_is_not_json_is_400_naming_no_field(edge: LiveServer) -> None:
    r = post(edge, "/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["param"] is None and error["message"].startswith("the body is not valid JSON")
