"""Every sampling parameter, through the official client, on the tiny random-weight model."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture()
def http(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def token_ids(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"model": "tiny-llama", "prompt": text})
    assert r.status_code == 200
    return r.json()["tokens"]


def greedy(client: openai.OpenAI, prompt: str = "Hello", **kw) -> openai.types.Completion:
    extra = {**IGNORE_EOS, **kw.pop("extra_body", {})}
    return client.completions.create(
        model="tiny-llama", prompt=prompt, temperature=0, extra_body=extra, **kw
    )


def generated_ids(r: openai.types.Completion) -> list[int]:
    """Exact ids, from logprobs with vLLM's return_tokens_as_token_ids."""
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": "tiny-llama", "prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    back = http.post("/detokenize", json={"model": "tiny-llama", "tokens": r["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    chat = http.post(
        "/tokenize",
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]},
    ).json()
    assert chat["count"] > r["count"] - 2
    bad = http.post("/detokenize", json={"model": "tiny-llama", "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_logit_bias_bans_and_forces(client: openai.OpenAI, http: httpx.Client) -> None:
    plain = greedy(client, max_tokens=6).choices[0].text
    first_id = token_ids(http, plain)[0]
    banned = greedy(client, max_tokens=6, logit_bias={str(first_id): -100}).choices[0].text
    assert first_id not in token_ids(http, banned)
    forced_id = token_ids(http, " the")[-1]
    forced = client.completions.create(
        model="tiny-llama",
        prompt="Hello",
        max_tokens=5,
        temperature=1.0,
        seed=3,
        logit_bias={str(forced_id): 100},
        extra_body=IGNORE_EOS,
    )
    piece = http.post("/detokenize", json={"model": "tiny-llama", "tokens": [forced_id]})
    assert forced.choices[0].text == piece.json()["prompt"] * 5


def test_top_k_1_and_min_p_1_equal_greedy(client: openai.OpenAI) -> None:
    want = greedy(client, max_tokens=10).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(
            model="tiny-llama",
            prompt="Hello",
            max_tokens=10,
            temperature=1.0,
            seed=5,
            extra_body={**IGNORE_EOS, **extra},
        )
        assert r.choices[0].text == want, extra


def repeats(http: httpx.Client, text: str) -> int:
    ids = token_ids(http, text)
    return len(ids) - len(set(ids))


@pytest.mark.parametrize(
    "penalty",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0, **IGNORE_EOS}},
    ],
)
def test_penalties_lower_repeats(client: openai.OpenAI, http: httpx.Client, penalty) -> None:
    prompt = "d d d d d d d d"  # built to repeat: greedy decoding on it loops
    plain = greedy(client, prompt=prompt, max_tokens=24).choices[0].text
    kw = {"extra_body": IGNORE_EOS, **penalty}
    penalized = (
        client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, **kw
        )
        .choices[0]
        .text
    )
    assert repeats(http, penalized) < repeats(http, plain)


def test_chat_top_logprobs_sorted_and_normalised(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=4,
        extra_body=IGNORE_EOS,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}  # skipped in the text
    spelled = [bytes(c.bytes) for c in content if c.token not in specials]
    joined = b"".join(spelled).decode(errors="replace")
    assert joined == r.choices[0].message.content  # tokens' bytes spell the text exactly
    for c in content:
        values = [t.logprob for t in c.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        assert c.logprob <= 0
    assert_valid(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


def test_chat_logprobs_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    entries = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == 4


def test_completion_logprobs_and_echo(client: openai.OpenAI, http: httpx.Client) -> None:
    prompt = "import os"
    n_prompt = len(token_ids(http, prompt))
    r = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=3,
        logprobs=2,
        echo=True,
        extra_body=IGNORE_EOS,
    )
    c = r.choices[0]
    assert c.text.startswith(prompt)
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert "".join(c.logprobs.tokens[:n_prompt]) == prompt
    assert c.logprobs.text_offset[n_prompt] == len(prompt)


def test_completion_top_logprobs_hold_the_token_itself(client: openai.OpenAI) -> None:
    """OpenAI and vLLM send up to logprobs+1 entries: the top k and the sampled (or echoed
    prompt) token; it was left out where it was not among the top k (most positions of a random
    model's prompt, and of its samples at temperature 1), streamed or not."""
    kw = dict(
        model="tiny-llama", prompt="import os\nimport sys", max_tokens=16, logprobs=2,
        temperature=1.0, seed=3, extra_body={**IGNORE_EOS, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = client.completions.create(echo=True, **kw).choices[0].logprobs
    columns = [(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:])]  # [0]: None
    for chunk in client.completions.create(stream=True, **kw):
        c = chunk.choices[0].logprobs
        columns += [(c.tokens, c.token_logprobs, c.top_logprobs)] if c else []
    positions = [p for col in columns for p in zip(*col, strict=True)]
    sizes = []
    for token, value, top in positions:
        assert math.isclose(top[token], value, abs_tol=1e-6)
        if len(top) == 3:  # the token is not among the top 2: it is the least likely entry
            assert value <= min(top.values()) + 1e-6
        sizes.append(len(top))
    assert set(sizes) == {2, 3}


def test_max_tokens_zero_scores_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    """OpenAI's spec allows max_tokens 0 on completions: with echo and logprobs it scores a
    prompt (the prompt's logprobs, nothing generated), as evaluation harnesses ask."""
    prompts = ["import os", "def f(x):"]
    kw = dict(model="tiny-llama", prompt=prompts, logprobs=1, echo=True)
    # (The first token's logprob is null, as OpenAI and vLLM send it; the spec's schema
    # says number, so no schema check here.)
    scored = client.completions.create(max_tokens=0, **kw)
    one = client.completions.create(max_tokens=1, temperature=0, **kw)
    assert scored.usage.completion_tokens == 0
    for prompt, c, ref in zip(prompts, scored.choices, one.choices, strict=True):
        n_prompt = len(token_ids(http, prompt))
        assert c.text == prompt and c.finish_reason == "length"
        assert c.logprobs.tokens == ref.logprobs.tokens[:n_prompt]
        lps, ref_lps = c.logprobs.token_logprobs, ref.logprobs.token_logprobs[:n_prompt]
        assert len(lps) == n_prompt and lps[0] is None
        # Close, not equal: unseeded rows may be batched otherwise in the two calls, and in
        # bf16 (GENSERVE_DTYPE=auto) a batch's kernels round a row's sums otherwise.
        pairs = zip(lps[1:], ref_lps[1:], strict=True)
        assert all(math.isclose(a, b, rel_tol=1e-2) for a, b in pairs)
    bare = client.completions.create(model="tiny-llama", prompt="x", max_tokens=0)
    assert bare.choices[0].text == "" and bare.usage.completion_tokens == 0
    chunks = list(client.completions.create(stream=True, max_tokens=0, **{**kw, "prompt": "ab"}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "ab"
    assert chunks[-1].choices[0].finish_reason == "length"
    # Streamed, the prompt's logprobs come with its echo (they were never sent).
    whole = client.completions.create(max_tokens=0, **{**kw, "prompt": "ab"}).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == whole.token_logprobs
    with pytest.raises(openai.BadRequestError):  # chat keeps its minimum of 1
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=0
        )


def test_best_of_returns_highest_cumulative_logprob(client: openai.OpenAI) -> None:
    kw = dict(model="tiny-llama", prompt="a", max_tokens=6, seed=11, extra_body=IGNORE_EOS)
    three = client.completions.create(n=3, logprobs=0, **kw)
    best = max(three.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    r = client.completions.create(n=1, best_of=3, **kw)
    assert len(r.choices) == 1 and r.choices[0].text == best.text
    assert r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 18


def test_n3_with_seed_differs_within_and_repeats_across_calls(client: openai.OpenAI) -> None:
    def run() -> list[str]:
        r = client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "tell me"}],
            n=3,
            seed=42,
            max_tokens=10,
            extra_body=IGNORE_EOS,
        )
        return [c.message.content for c in r.choices]

    first = run()
    assert len(set(first)) == 3
    assert run() == first


def test_stop_string_spanning_two_tokens(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=20, logprobs=0).choices[0]
    pieces = full.logprobs.tokens
    offsets = full.logprobs.text_offset
    # a stop string made of the end of one token and the start of the next
    i = next(
        i
        for i in range(2, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[i][-1] + pieces[i + 1][0]
    r = greedy(client, max_tokens=20, stop=stop)
    cut = full.text.index(stop)
    assert cut <= offsets[i] + len(pieces[i]) - 1
    assert r.choices[0].text == full.text[:cut] and r.choices[0].finish_reason == "stop"


def test_min_tokens_and_stop_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    eos = token_ids(http, "<|endoftext|>")[0]
    kw = dict(model="tiny-llama", prompt="a", max_tokens=20, logit_bias={str(eos): 100})
    assert client.completions.create(**kw).usage.completion_tokens == 1
    r = client.completions.create(**kw, extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"
    ids = generated_ids(
        greedy(client, max_tokens=8, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    )
    r = greedy(
        client,
        max_tokens=8,
        logprobs=0,
        extra_body={"stop_token_ids": [ids[2]], "return_tokens_as_token_ids": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert generated_ids(r) == ids[: ids.index(ids[2]) + 1]


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        extra_body=IGNORE_EOS,
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logprobs": 6}, "logprobs"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"repetition_penalty": 1e-300}}, "repetition_penalty"),  # was a 500
        ({"extra_body": {"min_tokens": 30}}, None),
    ],
)
def test_bad_sampling_values_are_400(client: openai.OpenAI, kwargs: dict, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=5, **kwargs)
    assert e.value.param == param
