"""Tool calls on /v1/chat/completions with the official client and a random-weight model: every
call it returns parses and matches its tool's schema, because the grammar let nothing else out.

The tiny model's template knows no tools, so these also run the fallback prompt (tools in the
system message, calls and results written into the turns) with the hermes syntax."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.conformance import assert_valid
from tests.server import LiveServer, start_server
from tests.tiny_model import build_tiny_model
from tests.tool_models import PAINT, TINT, responses_tool
from tests.tool_models import SCHEMAS as PYDANTIC_SCHEMAS

MODEL = "tiny-llama"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    """This module's own server: 32 slots, so the 100-sample batches run 32 at a time, and a
    1024-token context (the tiny tokenizer spends many tokens on a tools prompt)."""
    folder = tmp_path_factory.mktemp("tools")
    model = build_tiny_model(folder / MODEL, max_position_embeddings=1024)
    srv = start_server(model, folder, "--max-batch-size", "32")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_calls(calls, name: str | None) -> None:  # noqa: ANN001
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert name is None or call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def streamed_calls(aclient: openai.AsyncOpenAI, **kw) -> tuple[list[dict], str | None]:
    """The calls as a client rebuilds them from the chunks: id and name first, then fragments."""
    calls: list[dict] = []
    reason = None
    async for chunk in await aclient.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for d in choice.delta.tool_calls or ():
                if d.id is not None:
                    assert d.index == len(calls) and d.function.name
                    calls.append({"id": d.id, "name": d.function.name, "arguments": ""})
                calls[d.index]["arguments"] += d.function.arguments or ""
    return calls, reason


@pytest.mark.parametrize("choice", ["required", "named"])
async def test_100_of_100_seeded_calls_parse_streamed_and_not(
    aclient: openai.AsyncOpenAI, choice: str
) -> None:
    tool_choice = "required" if choice == "required" else NAMED
    name = None if choice == "required" else "get_weather"

    def kw(seed: int) -> dict:
        # One tool keeps the prompt short (the tiny model's context is 512 tokens).
        return dict(
            model=MODEL, messages=MESSAGES, tools=TOOLS[:1], tool_choice=tool_choice, seed=seed,
            temperature=1.0, max_tokens=100, parallel_tool_calls=False,
        )  # fmt: skip

    seeds = range(100)
    plain = await asyncio.gather(*[aclient.chat.completions.create(**kw(s)) for s in seeds])
    streamed = await asyncio.gather(*[streamed_calls(aclient, **kw(s)) for s in seeds])
    for r, (calls, reason) in zip(plain, streamed, strict=True):
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and reason == "tool_calls"
        assert c.message.content is None and len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls, name)
        # The same seed streamed: its fragments join into exactly these arguments.
        want = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
        assert [(x["name"], x["arguments"]) for x in calls] == want
    assert len({r.choices[0].message.tool_calls[0].function.arguments for r in plain}) > 50


async def test_parallel_calls_each_parse(aclient: openai.AsyncOpenAI) -> None:
    counts = []
    replies = await asyncio.gather(
        *[
            aclient.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice="required",
                seed=seed,
                max_tokens=130,
            )  # fmt: skip
            for seed in range(8)
        ]
    )
    for r in replies:
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            check_calls(c.message.tool_calls, None)
        counts.append(len(c.message.tool_calls))
    assert max(counts) > 1  # the grammar lets the model add calls when parallel_tool_calls


def test_none_never_returns_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none", seed=1, n=4,
        max_tokens=40,
    )  # fmt: skip
    for c in r.choices:
        assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")


def test_auto_gives_text_or_calls_that_parse(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, seed=2, n=4, max_tokens=40
    )
    for c in r.choices:
        if c.message.tool_calls:
            assert c.finish_reason in ("tool_calls", "length")
        else:
            assert isinstance(c.message.content, str)


def test_history_with_tool_results_is_accepted(client: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c","days":1}'},
    }
    messages = [
        {"role": "system", "content": "You are terse."},
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS[:1], tool_choice=NAMED, seed=3, max_tokens=100
    )
    check_calls(r.choices[0].message.tool_calls, "get_weather")
    # The history's call and result reached the prompt: it is longer than without them.
    short = client.chat.completions.create(
        model=MODEL, messages=messages[:2], tools=TOOLS[:1], max_tokens=1
    )
    assert r.usage.prompt_tokens > short.usage.prompt_tokens


@pytest.mark.parametrize(
    "turn,field",
    [
        ({"role": "tool", "content": '{"temp": 21}'}, "tool_call_id"),
        ({"role": "function", "content": '{"temp": 21}'}, "name"),
    ],
)
def test_a_result_turn_without_its_link_is_400_naming_it(
    client: openai.OpenAI, turn: dict, field: str
) -> None:
    """It was accepted (the result rendered as answering no call); OpenAI's 400 names it."""
    messages = [*MESSAGES, {"role": "assistant", "content": "checking"}, turn]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert e.value.param == f"messages.[2].{field}"
    assert e.value.body["type"] == "invalid_request_error" and field in e.value.message


def test_a_turn_with_both_call_dialects_and_tokenize_are_checked_alike(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """An assistant turn holding tool_calls and function_call is OpenAI's 400; /tokenize
    refuses what chat refuses (it counted a result turn with no call id)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    both = {
        "role": "assistant",
        "tool_calls": [call],
        "function_call": {"name": "f", "arguments": "{}"},
    }
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[*MESSAGES, both], max_tokens=2)
    assert e.value.param == "messages.[1].function_call"
    unlinked = [*MESSAGES, {"role": "tool", "content": "21"}]
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": unlinked})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.[1].tool_call_id"


@pytest.mark.parametrize(
    "extra,param,words",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "not": {"required": ["a"]}}}}]},
         "tools", "'not'"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
    ],
)  # fmt: skip
def test_bad_tools_are_400_naming_the_param(
    client: openai.OpenAI, extra: dict, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=extra
        )
    assert e.value.param is not None and e.value.param.startswith(param), e.value.param
    assert words in e.value.message


async def test_bodies_and_chunks_validate_against_openai_schemas(server: LiveServer) -> None:
    body = {
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
        "seed": 5, "max_tokens": 130,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert_valid(r.json(), "CreateChatCompletionResponse")
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)


def test_langchain_bind_tools_required(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    # A bounded string: a random-weight model must finish the call within max_tokens.
    get_time = {"type": "function", "function": {"name": "get_time", "parameters": TIME}}
    llm = ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=120,
        seed=7, max_retries=0,
    )  # fmt: skip
    msg = llm.bind_tools([get_time], tool_choice="required").invoke("what time is it in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_time"
    assert isinstance(msg.tool_calls[0]["args"]["zone"], str)


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
async def test_pydantic_tools_with_refs_call_by_their_own_schemas(
    aclient: openai.AsyncOpenAI, choice: str
) -> None:
    """`pydantic_function_tool` writes Enum fields and nested models as `$defs` + `$ref`; both
    tools here define a `Color` (other values each). They were refused 400 (the refs no longer
    resolved once nested in the call grammar); each call must match its own tool's schema."""
    tool_choice = {"auto": "auto", "required": "required"}.get(
        choice, {"type": "function", "function": {"name": "Tint"}}
    )
    kw = dict(
        model=MODEL, messages=MESSAGES, tools=[PAINT, TINT], tool_choice=tool_choice, n=4,
        temperature=1.0, max_tokens=120, parallel_tool_calls=False,
    )  # fmt: skip
    replies = [await aclient.chat.completions.create(seed=s, **kw) for s in range(3)]
    calls = [c for r in replies for ch in r.choices for c in ch.message.tool_calls or ()]
    assert choice == "auto" or len(calls) == 12
    for call in calls:
        assert choice != "named" or call.function.name == "Tint"
        jsonschema.validate(
            json.loads(call.function.arguments), PYDANTIC_SCHEMAS[call.function.name]
        )
    if choice == "required":
        assert {c.function.name for c in calls} == {"Paint", "Tint"}
    if choice != "auto":  # streamed, the same seed joins into the same call
        streamed, reason = await streamed_calls(aclient, seed=0, **{**kw, "n": 1})
        first = replies[0].choices[0].message.tool_calls[0].function
        assert reason == "tool_calls" and streamed[0]["arguments"] == first.arguments


@pytest.mark.parametrize("named", [False, True])
def test_responses_tools_with_refs_call_by_their_own_schemas(
    client: openai.OpenAI, named: bool
) -> None:
    choice = {"type": "function", "name": "Paint"} if named else "required"
    for seed in range(4):
        r = client.responses.create(
            model=MODEL, input="Paint it", tools=[responses_tool(PAINT), responses_tool(TINT)],
            tool_choice=choice, max_output_tokens=120, parallel_tool_calls=False,
            extra_body={"seed": seed},
        )  # fmt: skip
        (call,) = [item for item in r.output if item.type == "function_call"]
        assert not named or call.name == "Paint"
        jsonschema.validate(json.loads(call.arguments), PYDANTIC_SCHEMAS[call.name])


# -- the deprecated `functions` / `function_call` -----------------------------------------------
FUNCTIONS = [
    {"name": "get_weather", "parameters": WEATHER},
    {"name": "get_time", "parameters": TIME},
]


async def test_functions_answer_one_function_call_streamed_and_not(
    aclient: openai.AsyncOpenAI,
) -> None:
    """They were ignored (plain text came back). Now: message.function_call, finish_reason
    "function_call", no tool_calls, and one call only (a second one streamed would have joined
    its arguments to the first's, which then would not parse)."""
    kw = dict(
        model=MODEL, messages=MESSAGES, functions=FUNCTIONS,
        function_call={"name": "get_weather"}, temperature=1.0, max_tokens=130,
    )  # fmt: skip
    for seed in range(8):
        r = await aclient.chat.completions.create(seed=seed, **kw)
        c = r.choices[0]
        assert c.finish_reason == "function_call" and c.message.tool_calls is None
        assert c.message.content is None and c.message.function_call.name == "get_weather"
        jsonschema.validate(json.loads(c.message.function_call.arguments), WEATHER)
        name, args, reason = None, "", None
        async for chunk in await aclient.chat.completions.create(seed=seed, stream=True, **kw):
            delta = chunk.choices[0].delta
            assert delta.tool_calls is None
            reason = chunk.choices[0].finish_reason or reason
            if delta.function_call is not None:
                name = name or delta.function_call.name
                args += delta.function_call.arguments or ""
        assert (name, args, reason) == (
            "get_weather",
            c.message.function_call.arguments,
            "function_call",
        )


async def test_functions_bodies_and_chunks_validate_against_openai_schemas(
    server: LiveServer,
) -> None:
    body = {
        "model": MODEL, "messages": MESSAGES, "functions": FUNCTIONS, "function_call": "auto",
        "seed": 5, "max_tokens": 130, "n": 4,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert_valid(r.json(), "CreateChatCompletionResponse")
        forced = {**body, "function_call": {"name": "get_time"}, "n": 1, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=forced) as s:
            lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
    for c in r.json()["choices"]:
        assert "tool_calls" not in c["message"] and c["finish_reason"] != "tool_calls"
        assert ("function_call" in c["message"]) == (c["finish_reason"] == "function_call")
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def test_function_call_none_returns_no_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, functions=FUNCTIONS, function_call="none", seed=1, n=4,
        max_tokens=40,
    )  # fmt: skip
    for c in r.choices:
        assert c.message.function_call is None and c.finish_reason in ("stop", "length")


def test_function_turns_in_the_history_reach_the_prompt(client: openai.OpenAI) -> None:
    call = {"name": "get_time", "arguments": '{"zone":"UTC"}'}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_time", "content": '{"time": "12:00"}'},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, functions=FUNCTIONS, max_tokens=1
    )
    short = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, functions=FUNCTIONS, max_tokens=1
    )
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 10


@pytest.mark.parametrize(
    "extra,param,words",
    [
        ({"functions": FUNCTIONS, "tools": TOOLS}, "functions", "tools"),
        ({"functions": FUNCTIONS, "tool_choice": "auto"}, "functions", "tool_choice"),
        ({"function_call": "auto", "tools": TOOLS}, "function_call", "tools"),
        ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call", "nope"),
        ({"function_call": {"name": "get_time"}}, "function_call", "functions"),
        ({"functions": []}, "functions", ""),
    ],
)
def test_bad_functions_are_400_naming_the_param(
    client: openai.OpenAI, extra: dict, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=extra
        )
    assert e.value.param is not None and e.value.param.startswith(param), e.value.param
    assert words in e.value.message


def test_langchain_functions_round_trip(server: LiveServer) -> None:
    """Older LangChain code: bind(functions=..., function_call=...), then the result sent back
    as a FunctionMessage."""
    from langchain_core.messages import FunctionMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=120,
        seed=7, max_retries=0,
    )  # fmt: skip
    ask = HumanMessage("what time is it in Oslo?")
    fn = FUNCTIONS[1]
    msg = llm.bind(functions=[fn], function_call={"name": "get_time"}).invoke([ask])
    call = msg.additional_kwargs["function_call"]
    assert call["name"] == "get_time" and not msg.tool_calls
    jsonschema.validate(json.loads(call["arguments"]), TIME)
    result = FunctionMessage(name="get_time", content='{"time": "12:00"}')
    answer = llm.bind(functions=[fn]).invoke([ask, msg, result])
    assert isinstance(answer.content, str)


# -- a forced call cut by max_tokens before its arguments begin ---------------------------------
# The tiny tokenizer spends more than 8 tokens on `<tool_call>\n{"name":"get_weather",
# "arguments":`: each of these ends a forced call in its markup or its head.
HEAD_CUTS = (1, 4, 8)
FORCED = {
    # one tool: "required" can call only it
    "required": dict(tools=TOOLS[:1], tool_choice="required"),
    # two tools whose names share "get_": the choice names the one
    "named": dict(tools=TOOLS, tool_choice=NAMED),
    "function_call": dict(functions=FUNCTIONS, function_call={"name": "get_weather"}),
}


async def streamed_function_call(aclient: openai.AsyncOpenAI, **kw) -> tuple[list[dict], str]:
    """A legacy stream's one call, as streamed_calls gives the calls of a tools stream."""
    calls: list[dict] = []
    reason = None
    async for chunk in await aclient.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        fn = choice.delta.function_call
        if fn is not None and fn.name:
            calls.append({"id": None, "name": fn.name, "arguments": ""})
        if fn is not None:
            calls[-1]["arguments"] += fn.arguments or ""
    return calls, reason


@pytest.mark.parametrize("choice", list(FORCED))
@pytest.mark.parametrize("max_tokens", HEAD_CUTS)
async def test_a_forced_call_cut_before_its_arguments_comes_back_named(
    aclient: openai.AsyncOpenAI, choice: str, max_tokens: int
) -> None:
    """It vanished: an empty message, the call's markup only in the logprobs. OpenAI answers
    the call as far as it was written, its name and its (here empty) arguments, with
    finish_reason "length"; streamed alike."""
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, seed=4, **FORCED[choice])
    r = await aclient.chat.completions.create(logprobs=True, **kw)
    c = r.choices[0]
    written = "".join(t.token for t in c.logprobs.content)
    assert '"arguments"' not in written  # cut before them, as this test means to
    assert c.finish_reason == "length" and c.message.content is None
    if choice == "function_call":
        assert c.message.tool_calls is None
        got = [(c.message.function_call.name, c.message.function_call.arguments)]
        streamed, reason = await streamed_function_call(aclient, **kw)
    else:
        assert c.message.tool_calls[0].id.startswith("call_")
        got = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
        streamed, reason = await streamed_calls(aclient, **kw)
    assert got == [("get_weather", "")]
    assert [(x["name"], x["arguments"]) for x in streamed] == got and reason == "length"


async def test_a_forced_call_cut_inside_its_arguments_still_shows_them(
    aclient: openai.AsyncOpenAI,
) -> None:
    """What already held, kept: a call cut inside its arguments shows the part written."""
    kw = dict(model=MODEL, messages=MESSAGES, seed=4, **FORCED["named"])
    whole = await aclient.chat.completions.create(max_tokens=100, logprobs=True, **kw)
    tokens = [t.token for t in whole.choices[0].logprobs.content]
    # The same seed again, cut one token after its arguments open.
    cut = next(i for i in range(len(tokens)) if '"arguments":{' in "".join(tokens[:i])) + 1
    r = await aclient.chat.completions.create(max_tokens=cut, **kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length" and call.function.name == "get_weather"
    assert call.function.arguments.startswith("{")
    assert (
        whole.choices[0]
        .message.tool_calls[0]
        .function.arguments.startswith(call.function.arguments)
    )
    streamed, reason = await streamed_calls(aclient, max_tokens=cut, **kw)
    assert streamed[0]["arguments"] == call.function.arguments and reason == "length"


@pytest.mark.parametrize("max_tokens", HEAD_CUTS)
def test_a_forced_responses_call_cut_before_its_arguments_is_an_incomplete_item(
    client: openai.OpenAI, server: LiveServer, max_tokens: int
) -> None:
    """Responses: the function_call item with what was written, the response incomplete for
    max_output_tokens (it was one empty message)."""
    kw = dict(
        model=MODEL, input="What is the weather in Paris?", tools=[responses_tool(TOOLS[0])],
        tool_choice="required", max_output_tokens=max_tokens, extra_body={"seed": 4},
    )  # fmt: skip
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(i.type, i.name, i.arguments, i.status) for i in r.output] == [
        ("function_call", "get_weather", "", "incomplete")
    ]
    final = None
    for event in client.responses.create(stream=True, **kw):
        final = getattr(event, "response", final)
    assert final.status == "incomplete"
    assert [(i.type, i.name, i.arguments) for i in final.output] == [
        ("function_call", "get_weather", "")
    ]


# -- a choice without tools, and choices pydantic could not name --------------------------------
ONLY_WITH_TOOLS = "is only allowed when '{}' are specified"


def post_error(server: LiveServer, path: str, body: dict) -> dict:
    """OpenAI's error shape, with a 400."""
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "extra,param,words",
    [
        # OpenAI refuses every tool_choice without tools, "none" too (api/tools.py says why)
        *[({"tool_choice": v}, "tool_choice", ONLY_WITH_TOOLS.format("tools"))
          for v in ("none", "auto", "required", NAMED)],
        # an empty tools array is OpenAI's 400 of its own, with or without a choice
        *[({"tools": [], **more}, "tools", "Invalid 'tools': empty array")
          for more in ({}, {"tool_choice": "auto"})],
        ({"parallel_tool_calls": False}, "parallel_tool_calls",
         "'parallel_tool_calls' is only allowed when 'tools' are specified"),
        *[({"function_call": v}, "function_call", ONLY_WITH_TOOLS.format("functions"))
          for v in ("none", "auto", {"name": "get_time"})],
        # the legacy dialect's own names, not the tools'
        ({"functions": FUNCTIONS, "response_format": {"type": "json_schema", "json_schema": {
            "name": "w", "schema": WEATHER}}}, "response_format", "`functions`"),
        # one param and one message, not pydantic's per-member `function_call.literal[...]`
        ({"functions": FUNCTIONS, "function_call": "sometimes"}, "function_call",
         "invalid value 'sometimes': expected 'none' or 'auto', or an object naming a function"),
        ({"functions": FUNCTIONS, "function_call": 3}, "function_call", "expected 'none' or"),
        ({"functions": FUNCTIONS, "function_call": {"nam": "x"}}, "function_call", "name"),
        ({"functions": FUNCTIONS, "function_call": {"name": "a b"}}, "function_call", "pattern"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice",
         "expected 'none', 'auto' or 'required', or an object naming a function"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "function"),
    ],
)  # fmt: skip
def test_choice_errors_name_the_param_alone(
    client: openai.OpenAI, server: LiveServer, extra: dict, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=extra
        )
    assert e.value.param == param and words in e.value.message, e.value.message
    assert "`tools`" not in e.value.message or param != "response_format"
    post_error(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, **extra})


def test_responses_take_auto_and_none_without_tools_and_refuse_the_rest(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """A Response echoes tool_choice ("auto" by default) beside its tools, [] too: what it
    echoes is taken back; a choice no tool can meet is not."""
    for mode in ("auto", "none"):
        r = client.responses.create(model=MODEL, input="x", tool_choice=mode, max_output_tokens=2)
        assert r.tool_choice == mode and r.tools == []
    for choice in ("required", {"type": "function", "name": "get_time"}):
        error = post_error(server, "/v1/responses", {"input": "x", "tool_choice": choice})
        assert error["param"] == "tool_choice"
        assert ONLY_WITH_TOOLS.format("tools") in error["message"]
    error = post_error(server, "/v1/responses", {"input": "x", "tool_choice": "sometimes"})
    assert error["param"] == "tool_choice" and "expected 'none', 'auto'" in error["message"]
