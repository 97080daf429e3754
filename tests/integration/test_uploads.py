"""OpenAI's Uploads API on a live server with two projects' keys, through the official
client: `upload_file_chunked` makes a File whose bytes are the parts' in the order named and
that fine-tuning takes; a completion refused (parts missing, unknown or repeated, a wrong MD5,
a bad fine-tune line) leaves the upload pending to be completed again; cancelled and
completed uploads take nothing more; another project's key gets 404; limits answer 400 and
quotas 429; a pending upload's parts survive a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
import pytest

from tests.conformance import assert_valid
from tests.integration.test_tenants import training_data
from tests.server import LiveServer, start_server

A, B = "sk-up-a", "sk-up-b"
MAX_FILE = 256 * 1024
QUOTA = 400 * 1024  # a project's files together


def start(tiny_model_dir: Path, root: Path) -> LiveServer:
    args = (
        "--data-dir", str(root / "data"), "--max-file-bytes", str(MAX_FILE),
        "--max-file-bytes-per-project", str(QUOTA),
    )  # fmt: skip
    env = {"GENSERVE_API_KEYS": f"{A},{B}"}
    (root / "logs").mkdir(exist_ok=True)
    return start_server(tiny_model_dir, root / "logs", *args, env=env)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, root: Path) -> LiveServer:
    live = start(tiny_model_dir, root)
    yield live
    live.stop()


def api(srv: LiveServer, key: str = A) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def parts(client: openai.OpenAI, upload_id: str, *chunks: bytes) -> list[str]:
    return [client.uploads.parts.create(upload_id, data=c).id for c in chunks]


def test_chunked_upload_makes_a_file_fine_tuning_takes(srv: LiveServer, tmp_path: Path) -> None:
    client = api(srv)
    data = training_data(400)  # ~40 KB in parts of 8 KB
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    up = client.uploads.upload_file_chunked(
        file=path, mime_type="text/jsonl", purpose="fine-tune", part_size=8 * 1024,
        md5=hashlib.md5(data).hexdigest(),
    )  # fmt: skip
    assert up.status == "completed" and up.object == "upload" and up.bytes == len(data)
    assert up.file is not None and up.file.bytes == len(data) and up.file.purpose == "fine-tune"
    assert up.file.filename == "train.jsonl"
    assert client.files.content(up.file.id).read() == data
    raw = client.uploads.with_raw_response
    body = raw.create(bytes=1, filename="x", mime_type="text/plain", purpose="user_data")
    assert_valid(body.http_response.json(), "Upload")
    client.uploads.cancel(body.parse().id)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=up.file.id)
    assert job.training_file == up.file.id
    client.fine_tuning.jobs.cancel(job.id)


def test_parts_join_in_the_order_named(srv: LiveServer) -> None:
    client = api(srv)
    up = client.uploads.create(bytes=6, filename="x.txt", mime_type="text/plain",
                               purpose="user_data")  # fmt: skip
    assert up.status == "pending" and up.file is None and up.expires_at > up.created_at
    first, second = parts(client, up.id, b"abc", b"def")
    done = client.uploads.complete(up.id, part_ids=[second, first])
    assert done.status == "completed"
    assert client.files.content(done.file.id).read() == b"defabc"


@pytest.mark.parametrize(
    ("named", "param"),
    [
        (lambda p: p[:1], "part_ids"),  # bytes short of the upload's
        (lambda p: [p[0], p[0]], "part_ids"),  # a part twice
        (lambda p: [p[0], "part_unknown"], "part_ids"),
        (lambda p: [], "part_ids"),
    ],
)
def test_a_refused_completion_leaves_it_pending(srv: LiveServer, named, param: str) -> None:  # noqa: ANN001
    client = api(srv)
    up = client.uploads.create(bytes=6, filename="y.txt", mime_type="text/plain",
                               purpose="user_data")  # fmt: skip
    got = parts(client, up.id, b"abc", b"def")
    with pytest.raises(openai.BadRequestError) as e:
        client.uploads.complete(up.id, part_ids=named(got))
    assert e.value.param == param
    done = client.uploads.complete(up.id, part_ids=got)  # then done right
    assert client.files.content(done.file.id).read() == b"abcdef"


def test_md5_is_checked(srv: LiveServer) -> None:
    client = api(srv)
    up = client.uploads.create(bytes=3, filename="z.txt", mime_type="text/plain",
                               purpose="user_data")  # fmt: skip
    got = parts(client, up.id, b"xyz")
    with pytest.raises(openai.BadRequestError) as e:
        client.uploads.complete(up.id, part_ids=got, md5="0" * 32)
    assert e.value.param == "md5"
    before = {f.id for f in client.files.list(purpose="user_data")}
    done = client.uploads.complete(up.id, part_ids=got, md5=hashlib.md5(b"xyz").hexdigest())
    assert done.file.id not in before  # the refused try made no File


def test_a_bad_fine_tune_line_is_refused_at_completion(srv: LiveServer) -> None:
    client = api(srv)
    data = training_data(3) + b"{not json\n"
    up = client.uploads.create(bytes=len(data), filename="bad.jsonl", mime_type="text/jsonl",
                               purpose="fine-tune")  # fmt: skip
    got = parts(client, up.id, data)
    with pytest.raises(openai.BadRequestError) as e:
        client.uploads.complete(up.id, part_ids=got)
    assert e.value.code == "invalid_file_format" and "line 4" in e.value.message
    client.uploads.cancel(up.id)


def test_cancelled_and_completed_take_nothing_more(srv: LiveServer) -> None:
    client = api(srv)
    up = client.uploads.create(bytes=4, filename="c.txt", mime_type="text/plain",
                               purpose="user_data")  # fmt: skip
    got = parts(client, up.id, b"ab")
    cancelled = client.uploads.cancel(up.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    for call in (
        lambda: client.uploads.parts.create(up.id, data=b"cd"),
        lambda: client.uploads.complete(up.id, part_ids=got),
        lambda: client.uploads.cancel(up.id),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == "upload_id" and "cancelled" in e.value.message
    up = client.uploads.create(bytes=2, filename="d.txt", mime_type="text/plain",
                               purpose="user_data")  # fmt: skip
    client.uploads.complete(up.id, part_ids=parts(client, up.id, b"ok"))
    with pytest.raises(openai.BadRequestError):
        client.uploads.cancel(up.id)


def test_another_project_gets_404(srv: LiveServer) -> None:
    a, b = api(srv, A), api(srv, B)
    up = a.uploads.create(bytes=2, filename="a.txt", mime_type="text/plain", purpose="user_data")
    for call in (
        lambda: b.uploads.parts.create(up.id, data=b"xx"),
        lambda: b.uploads.complete(up.id, part_ids=["part_x"]),
        lambda: b.uploads.cancel(up.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert a.uploads.cancel(up.id).status == "cancelled"  # A's upload untouched by B


def test_limits(srv: LiveServer) -> None:
    client = api(srv, B)
    with pytest.raises(openai.BadRequestError) as e:  # past --max-file-bytes
        client.uploads.create(bytes=MAX_FILE + 1, filename="big", mime_type="text/plain",
                              purpose="user_data")  # fmt: skip
    assert e.value.param == "bytes" and e.value.code == "file_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        client.uploads.create(bytes=5, filename="p", mime_type="text/plain", purpose="nope")
    assert e.value.param == "purpose"
    for bad in ({"bytes": 0}, {"bytes": "5"}, {"filename": ""}, {"extra": 1}):
        body = {"bytes": 5, "filename": "f", "mime_type": "text/plain", "purpose": "user_data"}
        with pytest.raises(openai.BadRequestError):
            client.post("/uploads", body={**body, **bad}, cast_to=object)
    up = client.uploads.create(bytes=4, filename="q", mime_type="text/plain", purpose="user_data")
    with pytest.raises(openai.BadRequestError) as e:  # the parts may not pass the bytes
        parts(client, up.id, b"12345")
    assert e.value.param == "data"
    with pytest.raises(openai.BadRequestError) as e:
        client.post(f"/uploads/{up.id}/parts", body={"data": "x"}, cast_to=object)
    assert e.value.param == "data"
    client.uploads.cancel(up.id)


def test_quota_answers_429_before_any_part(srv: LiveServer) -> None:
    client = api(srv, B)
    first = client.uploads.create(bytes=MAX_FILE, filename="one", mime_type="text/plain",
                                  purpose="user_data")  # fmt: skip
    done = client.uploads.complete(first.id, part_ids=parts(client, first.id, b"x" * MAX_FILE))
    with pytest.raises(openai.RateLimitError) as e:  # B's files would pass QUOTA
        client.uploads.create(bytes=MAX_FILE, filename="two", mime_type="text/plain",
                              purpose="user_data")  # fmt: skip
    assert e.value.code == "quota_exceeded"
    client.files.delete(done.file.id)  # room again
    second = client.uploads.create(bytes=MAX_FILE, filename="two", mime_type="text/plain",
                                   purpose="user_data")  # fmt: skip
    client.uploads.cancel(second.id)


def test_a_pending_upload_survives_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    live = start(tiny_model_dir, tmp_path)
    try:
        client = api(live)
        up = client.uploads.create(bytes=6, filename="r.txt", mime_type="text/plain",
                                   purpose="user_data")  # fmt: skip
        got = parts(client, up.id, b"abc")
    finally:
        live.stop()
    live = start(tiny_model_dir, tmp_path)
    try:
        client = api(live)
        got += parts(client, up.id, b"def")
        done = client.uploads.complete(up.id, part_ids=got)
        assert client.files.content(done.file.id).read() == b"abcdef"
        parts_dir = tmp_path / "data" / "uploads" / up.id
        assert not parts_dir.exists()  # a completed upload's parts are gone
    finally:
        live.stop()


def test_a_client_leaving_mid_part_stores_nothing(srv: LiveServer) -> None:
    """A part whose body stops half way (the client went away) is not kept: the upload's
    bytes stay free for the part sent again, and the server answers the next request."""
    import socket

    client = api(srv)
    up = client.uploads.create(bytes=4096, filename="cut.bin", mime_type="application/octet-stream",
                               purpose="user_data")  # fmt: skip
    boundary = "cutcutcut"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"d\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST /v1/uploads/{up.id}/parts HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {A}\r\nContent-Length: {len(head) + 4096 + 64}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            + head
            + b"x" * 1000
        )  # half a part, then gone
    done = client.uploads.complete(up.id, part_ids=parts(client, up.id, b"y" * 4096))
    assert client.files.content(done.file.id).read() == b"y" * 4096
