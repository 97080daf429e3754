"""One request cannot hurt the others (issue 13, items 2, 3, 4 and 10), on a live server.

Poisoned requests run beside a normal seeded stream, which must complete with every token and
the same text it gives alone. Concurrency is asserted by the order of replies, never timed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import LiveServer, start_server

MODEL = "tiny-llama"
NORMAL = {
    "model": MODEL,
    "prompt": "the",
    "max_tokens": 200,
    "ignore_eos": True,
    "seed": 11,
    "temperature": 1.0,
}
# Passes the edge (its first tokens compile and probe fine) and runs out of lexer fuel later.
LATE_FAILING = "^(y|z){40}(x{1000}){1000}$"
SLOW_TEMPLATE = (
    "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
    "{% for d in range(1000) %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}"
    "{{ messages[-1]['content'] }}"
)


def pattern_format(pattern: str) -> dict:
    schema = {"type": "string", "pattern": pattern}
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}


def build_wordlevel_model(folder: Path) -> Path:
    """A tiny Llama whose tokenizer is WordLevel with no decoder: llguidance cannot read it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "red", "blue"]
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=len(fast), max_position_embeddings=128,
        eos_token_id=0, bos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def models_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iso-models")
    shutil.copytree(tiny_model_dir, root / "doomed")  # registered, then unloaded mid-stream
    build_wordlevel_model(root / "wordlevel")
    return root


@pytest.fixture(scope="module")
def iso(tiny_model_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    args = ("--max-batch-size", "8", "--models-dir", str(models_dir))
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("iso-logs"), *args)
    yield srv
    srv.stop()


async def stream_completion(
    http: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None
) -> tuple[str, int, list]:
    """(text, completion tokens, error frames) of one streamed completion; `started` is set at
    its first text chunk."""
    text, tokens, errors = [], 0, []
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json={**body, **opts}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
            elif chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
                if started is not None:
                    started.set()
            else:
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens, errors


def wait_ready(url: str, model_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        card = httpx.get(f"{url}/v1/models/{model_id}").json()
        if card.get("status") != "loading":
            return card
        time.sleep(0.1)
    raise TimeoutError(model_id)


async def test_poisoned_requests_leave_a_normal_stream_whole(iso: LiveServer) -> None:
    done: list[str] = []  # the order in which replies came back
    async with httpx.AsyncClient(base_url=iso.url, timeout=300) as http:

        async def normal() -> tuple[str, int, list]:
            out = await stream_completion(http, NORMAL)
            done.append("normal")
            return out

        async def post(name: str, path: str, body: dict) -> httpx.Response:
            r = await http.post(path, json=body)
            done.append(name)
            return r

        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        late_body = {**chat, "max_tokens": 100, "response_format": pattern_format(LATE_FAILING)}
        # Compiled once before the stream: a compile runs on idle-priority threads, which a
        # busy machine may leave waiting until the stream is over, and then "late" could not
        # show that it failed beside it.
        assert (await http.post("/v1/chat/completions", json=late_body)).status_code == 400
        stream = asyncio.create_task(normal())
        replies = await asyncio.gather(
            post("top_k", "/v1/completions", {"prompt": "x", "temperature": 1, "top_k": 1e30,
                                              "model": MODEL}),  # fmt: skip
            post("unmatchable", "/v1/chat/completions",
                 {**chat, "response_format": pattern_format("^(x{1000}){1000}$")}),  # fmt: skip
            post("late", "/v1/chat/completions", late_body),
        )  # fmt: skip
        late_stream = await stream_completion(
            http, {"model": MODEL, "prompt": "a", "max_tokens": 100,
                   "response_format": pattern_format(LATE_FAILING)},
        )  # fmt: skip
        text, tokens, errors = await stream
        alone = await stream_completion(http, NORMAL)
    top_k, unmatchable, late = (r.json()["error"] for r in replies)
    assert [r.status_code for r in replies] == [400, 400, 400]
    assert top_k["param"] == "top_k"
    # Refused by the probe ("exceeds the grammar's limits") or, on a busy machine, the budget.
    assert unmatchable["param"] == "response_format"
    # Past the edge, failed mid-decode, inside the engine: that request alone ended.
    assert late["param"] == "response_format" and "grammar" in late["message"]
    assert late_stream[2] and late_stream[2][0]["param"] == "response_format"
    assert done.index("late") < done.index("normal")  # it failed while the stream ran
    assert (tokens, errors) == (200, [])  # every token, no error
    assert (text, tokens) == alone[:2]  # and the seeded text it gives alone


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"top_k": 10**6}, "top_k"),
        ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"stop": "s" * 1025}, "stop"),
        ("/v1/completions", {"n": 1, "best_of": 5}, "best_of"),
        ("/v1/chat/completions", {"n": 5}, "n"),
    ],
)
def test_edge_bounds_are_400s_naming_the_param(
    iso: LiveServer, path: str, extra: dict, param: str
) -> None:
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
    r = httpx.post(iso.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_slow_chat_template_is_refused_when_set(iso: LiveServer) -> None:
    client = openai.OpenAI(base_url=iso.url + "/v1", api_key="unused", max_retries=0)
    r = httpx.patch(f"{iso.url}/v1/models/{MODEL}", json={"chat_template": SLOW_TEMPLATE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert "too slow" in r.json()["error"]["message"]
    reply = client.chat.completions.create(  # the model's own template still serves
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"ignore_eos": True},  # unseeded: EOS must not end it first
    )
    assert reply.choices[0].finish_reason == "length"


async def test_health_answers_while_a_huge_prompt_is_tokenized(iso: LiveServer) -> None:
    # 3.5 MB (under the 4 MiB body limit): ~3 s of tokenizing on a 2-core EPYC, so the health
    # check 0.5 s in still finds it running on a machine several times faster (1 MB took 0.8 s).
    prompt = "hello world, this is a test. " * 120_000
    order: list[str] = []
    async with httpx.AsyncClient(base_url=iso.url, timeout=300) as http:
        # /tokenize counts any text: the whole body goes through the tokenizer.
        async def big() -> httpx.Response:
            r = await http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
            order.append("big")
            return r

        task = asyncio.create_task(big())
        await asyncio.sleep(0.5)  # the body is up and being tokenized
        health = await http.get("/health")
        order.append("health")
        r = await task
        # A completion cannot fit it in the context: refused before any tokenizing.
        refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert health.status_code == 200
    assert r.status_code == 200 and r.json()["count"] > 120_000
    assert order == ["health", "big"]  # answered while, not after
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "bytes, which is at least" in error["message"]


async def test_a_stream_in_flight_when_its_model_is_deleted_ends_with_an_error(
    iso: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=iso.url, timeout=120) as http:
        r = await http.post("/v1/models", json={"model": "doomed"})
        assert r.status_code == 202
        assert (await asyncio.to_thread(wait_ready, iso.url, "doomed"))["status"] == "ready"
        body = {**NORMAL, "model": "doomed", "max_tokens": 450}  # still running at the DELETE
        plain = asyncio.create_task(http.post("/v1/completions", json=body))
        started = asyncio.Event()
        stream = asyncio.create_task(stream_completion(http, body, started))
        await asyncio.wait_for(started.wait(), 60)  # decoding, beside the plain request
        assert (await http.delete("/v1/models/doomed")).status_code == 200
        _, tokens, errors = await asyncio.wait_for(stream, 60)  # ends, never hangs
        reply = await asyncio.wait_for(plain, 60)
    assert errors and errors[0]["type"] == "service_unavailable_error"
    assert tokens == 0  # no usage frame after an error
    assert reply.status_code == 503 and "unloaded" in reply.json()["error"]["message"]


def test_a_wordlevel_tokenizer_model_serves_text_and_refuses_response_format(
    iso: LiveServer,
) -> None:
    assert httpx.post(iso.url + "/v1/models", json={"model": "wordlevel"}).status_code == 202
    assert wait_ready(iso.url, "wordlevel")["status"] == "ready"
    client = openai.OpenAI(base_url=iso.url + "/v1", api_key="unused", max_retries=0)
    done = client.completions.create(
        model="wordlevel", prompt="the cat", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 5 and done.choices[0].text.strip()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="wordlevel", prompt="the", max_tokens=5,
            extra_body={"response_format": {"type": "json_object"}},
        )  # fmt: skip
    assert err.value.body["param"] == "response_format"
    assert "tokenizer" in err.value.body["message"]


async def test_health_answers_while_a_schema_compiles(iso: LiveServer) -> None:
    # Seconds of lexer work (not cached: the other tests used another pattern).
    fmt = pattern_format("^(x{999}){1000}$")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    order: list[str] = []
    async with httpx.AsyncClient(base_url=iso.url, timeout=300) as http:

        async def schema() -> httpx.Response:
            r = await http.post("/v1/chat/completions", json={**body, "response_format": fmt})
            order.append("schema")
            return r

        task = asyncio.create_task(schema())
        # The grammar is compiling: the whole call took 0.45-0.5 s after this on a 2-core EPYC
        # (the lexer stops at its size limit, whatever the repeat count), so 0.3 s left a
        # faster machine little margin.
        await asyncio.sleep(0.15)
        health = await http.get("/health")
        order.append("health")
        r = await task
    assert health.status_code == 200
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert order == ["health", "schema"]
