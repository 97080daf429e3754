"""/metrics on a live server with keys: real requests (answered, refused at the edge, sent to
paths no route has), then a scrape parsed by prometheus_client's parser, and each count grown
by exactly what the requests imply. No timing is asserted, only that each phase was observed.

Every test compares two scrapes of the module's own server, so it counts its own requests
only (the batch of the last test went through the engine too, and was finished before)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.test_fine_tuning import training_data
from tests.integration.test_operations import keys_cli
from tests.prom import Samples, grown, parse, value
from tests.server import LiveServer, start_server, wait_until

MODEL = "tiny-llama"
KEY = "gs-metrics-key"  # from the environment: no limits
MAX_BODY = 65536
SUCCESS = "genserve:request_success_total"
M = {"model_name": MODEL}


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("metrics")
    key_file = root / "keys.json"
    out = keys_cli(key_file, "create", "--name", "one-a-minute", "--rpm", "1")
    limited = re.search(r"key: (\S+)", out).group(1)
    live = start_server(
        tiny_model_dir, root, "--api-key-file", str(key_file),
        "--max-request-bytes", str(MAX_BODY), env={"GENSERVE_API_KEYS": KEY},
    )  # fmt: skip
    live.limited = limited
    yield live
    live.stop()


def scrape(srv: LiveServer) -> Samples:
    r = httpx.get(srv.url + "/metrics", timeout=10)  # exempt from keys
    assert r.status_code == 200
    return parse(r.text)


def api(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)


def keyed(srv: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"})


def http_growth(before: Samples, after: Samples) -> dict[tuple[str, str, str], float]:
    """http_requests_total's growth by (method, handler, status)."""
    return {
        (labels["method"], labels["handler"], labels["status"]): v
        for (name, key), v in grown(before, after).items()
        if name == "http_requests_total" and (labels := dict(key))
    }


def test_answered_requests_count_as_vllm_counts_them(srv: LiveServer) -> None:
    client = api(srv)
    before = scrape(srv)
    # Two choices that run to max_tokens; one that stops on its first token (the only token
    # it can draw, a stop token); a stream that runs to max_tokens.
    two = client.completions.create(
        model=MODEL, prompt="hello there", max_tokens=3, n=2, extra_body={"ignore_eos": True}
    )
    stop = client.completions.create(
        model=MODEL, prompt="count", max_tokens=5, temperature=0, logit_bias={"50": 100},
        extra_body={"stop_token_ids": [50]},
    )  # fmt: skip
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    after = scrape(srv)
    assert [c.finish_reason for c in two.choices] == ["length", "length"]
    assert stop.choices[0].finish_reason == "stop"
    streamed = chunks[-1].usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    def growth(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert growth(SUCCESS, finished_reason="length", **M) == 3
    assert growth(SUCCESS, finished_reason="stop", **M) == 1
    assert growth(SUCCESS, finished_reason="abort", **M) == 0
    assert growth(SUCCESS, finished_reason="error", **M) == 0
    # Per sequence (the n=2 call is two): its prompt read for each.
    prompts = 2 * two.usage.prompt_tokens + stop.usage.prompt_tokens + streamed.prompt_tokens
    generated = two.usage.completion_tokens + stop.usage.completion_tokens
    generated += streamed.completion_tokens
    assert growth("genserve:request_prompt_tokens_count", **M) == 4
    assert growth("genserve:request_prompt_tokens_sum", **M) == prompts
    assert growth("genserve:request_generation_tokens_count", **M) == 4
    assert growth("genserve:request_generation_tokens_sum", **M) == generated == 3 + 3 + 1 + 2
    assert growth("genserve:request_params_n_count", **M) == 3  # once per call (one prompt)
    assert growth("genserve:request_params_n_sum", **M) == 2 + 1 + 1
    assert growth("genserve:request_params_max_tokens_sum", **M) == 3 + 3 + 5 + 2
    for phase in ("queue", "prefill", "decode", "inference"):
        assert growth(f"genserve:request_{phase}_time_seconds_count", **M) == 4, phase
    assert growth("genserve:e2e_request_latency_seconds_count", **M) == 4
    assert http_growth(before, after) == {
        ("POST", "/v1/completions", "200"): 2,
        ("POST", "/v1/chat/completions", "200"): 1,
    }


def test_the_edges_refusals_count_under_their_route(srv: LiveServer) -> None:
    """A 401 (a wrong key, no key), a 429 (a key's requests per minute), an oversize body's
    400: answered before any route runs, counted under the route they were for. Paths no
    route has are `none`, whatever they hold (no series per id)."""
    ok, wrong, limited = (keyed(srv, k) for k in (KEY, "wrong", srv.limited))
    anyone = httpx.Client(base_url=srv.url)
    before = scrape(srv)
    sent = [
        wrong.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
        anyone.get("/v1/models"),
        limited.get("/v1/models"),
        limited.get("/v1/models"),
        ok.post("/v1/completions", json={"model": MODEL, "prompt": "x" * MAX_BODY}),
        ok.get("/v1/files/file-nope"),
        ok.get("/v1/files/file-nope/"),
        ok.get("/v1/files/file-other/"),
        ok.get("/no/such/path"),
    ]
    after = scrape(srv)
    assert [r.status_code for r in sent] == [401, 401, 200, 429, 400, 404, 307, 307, 404]
    assert sent[4].json()["error"]["code"] == "request_too_large"
    assert http_growth(before, after) == {
        ("POST", "/v1/completions", "401"): 1,
        ("GET", "/v1/models", "401"): 1,
        ("GET", "/v1/models", "200"): 1,
        ("GET", "/v1/models", "429"): 1,
        ("POST", "/v1/completions", "400"): 1,
        ("GET", "/v1/files/{file_id}", "404"): 1,
        ("GET", "none", "307"): 2,
        ("GET", "none", "404"): 1,
    }
    timed = {
        (labels["method"], labels["handler"]): v
        for (name, key), v in grown(before, after).items()
        if name == "http_request_duration_seconds_count" and (labels := dict(key))
    }
    assert timed == {
        ("POST", "/v1/completions"): 2,
        ("GET", "/v1/models"): 3,
        ("GET", "/v1/files/{file_id}"): 1,
        ("GET", "none"): 3,
    }
    # None of them reached the engine.
    assert not [k for k in grown(before, after) if k[0].startswith("genserve:")]


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def test_jobs_and_batches_by_status(srv: LiveServer) -> None:
    client = api(srv)
    tuning = client.files.create(file=("train.jsonl", training_data()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=tuning.id)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    line = {"custom_id": "one", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "x", "max_tokens": 2}}  # fmt: skip
    requests = client.files.create(file=("in.jsonl", jsonl([line])), purpose="batch")
    batch = client.batches.create(
        input_file_id=requests.id, endpoint="/v1/completions", completion_window="24h"
    )
    wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=60)
    got = scrape(srv)
    jobs = {dict(k)["status"]: v for (n, k), v in got.items() if n == "genserve:fine_tuning_jobs"}
    assert jobs["cancelled"] == 1 and sum(jobs.values()) == 1
    assert {"queued", "running", "paused", "succeeded", "failed"} <= jobs.keys()  # zeros too
    batches = {dict(k)["status"]: v for (n, k), v in got.items() if n == "genserve:batches"}
    assert batches["completed"] == 1 and sum(batches.values()) == 1
    assert {"validating", "in_progress", "failed", "cancelled"} <= batches.keys()
