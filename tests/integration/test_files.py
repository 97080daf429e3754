"""/v1/files against a live server with the official openai client: OpenAI's shapes, line-
numbered refusals of bad fine-tuning data, the size limit, bytes returned exactly."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

LIMIT = 16_384  # --max-file-bytes of this module's server


def chat_line(i: int) -> str:
    messages = [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": str(2 * i)},
    ]
    return json.dumps({"messages": messages})


GOOD = "".join(chat_line(i) + "\n" for i in range(5)).encode()


@pytest.fixture(scope="module")
def files_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    logs = tmp_path_factory.mktemp("files-server")
    srv = start_server(tiny_model_dir, logs, "--max-file-bytes", str(LIMIT))
    yield srv
    srv.stop()


@pytest.fixture()
def api(files_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=files_server.url + "/v1", api_key="unused", max_retries=0)


def test_upload_list_retrieve_content_delete(api: openai.OpenAI, files_server: LiveServer) -> None:
    raw = api.files.with_raw_response.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    assert_valid(raw.http_response.json(), "OpenAIFile")
    created = raw.parse()
    assert (created.bytes, created.filename, created.purpose) == (
        len(GOOD),
        "train.jsonl",
        "fine-tune",
    )
    assert created.id.startswith("file-") and created.status == "processed"

    assert api.files.retrieve(created.id) == created
    assert created.id in [f.id for f in api.files.list()]
    listing = httpx.get(files_server.url + "/v1/files").json()
    assert_valid(listing, "ListFilesResponse")
    assert api.files.content(created.id).read() == GOOD  # byte for byte

    deleted = api.files.with_raw_response.delete(created.id)
    assert_valid(deleted.http_response.json(), "DeleteFileResponse")
    assert deleted.parse().deleted
    with pytest.raises(openai.NotFoundError) as err:
        api.files.retrieve(created.id)
    assert_valid(err.value.response.json(), "ErrorResponse")
    assert err.value.body["param"] == "file_id"


def test_pages_newest_first(api: openai.OpenAI) -> None:
    ids = [api.files.create(file=("p.jsonl", GOOD), purpose="fine-tune").id for _ in range(3)]
    first = api.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    second = api.files.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    oldest_first = [f.id for f in api.files.list(order="asc") if f.id in ids]
    assert oldest_first == ids


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (GOOD + b"this is not json\n", "line 6: not valid JSON"),
        (
            GOOD + b'{"messages": [{"role": "wizard", "content": "x"}]}\n',
            "line 6: messages[0].role must be one of system, user, assistant",
        ),
        (b'{"messages": [{"role": "user", "content": "no answer"}]}\n', "line 1: `messages` needs"),
        (b"", "the file has no examples"),
    ],
    ids=["not-json", "wrong-role", "no-assistant", "empty"],
)
def test_bad_fine_tune_data_is_refused_with_its_line(
    api: openai.OpenAI, body: bytes, expected: str
) -> None:
    before = {f.id for f in api.files.list()}
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("bad.jsonl", body), purpose="fine-tune")
    assert_valid(err.value.response.json(), "ErrorResponse")
    assert err.value.body["param"] == "file"
    assert expected in err.value.body["message"]
    assert {f.id for f in api.files.list()} == before  # nothing half-stored


def test_over_the_size_limit_is_400_naming_file(api: openai.OpenAI) -> None:
    big = (chat_line(7) + "\n").encode() * (LIMIT // 40)
    assert len(big) > LIMIT
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert_valid(err.value.response.json(), "ErrorResponse")
    assert (err.value.body["param"], err.value.body["code"]) == ("file", "file_too_large")
    exact = GOOD * (LIMIT // len(GOOD))
    assert api.files.create(file=("fits.jsonl", exact), purpose="fine-tune").bytes == len(exact)


def test_other_purposes_are_stored_as_given(api: openai.OpenAI) -> None:
    data = b"\x00\x01 not jsonl at all"
    record = api.files.create(file=("blob.bin", data), purpose="user_data")
    assert api.files.content(record.id).read() == data


def test_malformed_requests(files_server: LiveServer) -> None:
    url = files_server.url + "/v1/files"
    cases = [
        ({"purpose": "fine-tune"}, None, "file"),
        ({"purpose": "homework"}, {"file": ("a.jsonl", GOOD)}, "purpose"),
    ]
    for data, files, param in cases:
        r = httpx.post(url, data=data, files=files)
        assert r.status_code == 400, r.text
        assert_valid(r.json(), "ErrorResponse")
        assert r.json()["error"]["param"] == param
    for method, path in [
        ("GET", "/file-nope"),
        ("DELETE", "/file-nope"),
        ("GET", "/file-nope/content"),
    ]:
        r = httpx.request(method, url + path)
        assert r.status_code == 404 and r.json()["error"]["param"] == "file_id"


def test_expires_after_sets_expires_at(api: openai.OpenAI, files_server: LiveServer) -> None:
    """OpenAI's expiration policy, sent as the official client sends it (multipart fields
    expires_after[anchor] and expires_after[seconds]); once it passes the file is gone (the
    clock's side is tests/unit/test_file_expiry.py)."""
    policy = {"anchor": "created_at", "seconds": 3600}
    raw = api.files.with_raw_response.create(
        file=("a.jsonl", GOOD), purpose="fine-tune", expires_after=policy
    )
    assert_valid(raw.http_response.json(), "OpenAIFile")
    card = raw.parse()
    assert card.expires_at == card.created_at + 3600
    assert api.files.retrieve(card.id).expires_at == card.expires_at
    plain = api.files.create(file=("b.jsonl", GOOD), purpose="fine-tune")
    assert plain.expires_at is None  # kept until deleted
    url = files_server.url + "/v1/files"
    for fields in (
        {"expires_after[anchor]": "created_at", "expires_after[seconds]": "59"},
        {"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"},
        {"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"},
        # Digits to str.isdigit, not to int(): a 500 before
        {"expires_after[anchor]": "created_at", "expires_after[seconds]": "³⁶⁰⁰"},
        {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
        {"expires_after[seconds]": "3600"},
        {"expires_after": "3600"},
    ):
        r = httpx.post(url, data={"purpose": "user_data", **fields}, files={"file": ("x", b"x")})
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"] == "expires_after", r.text
