"""Tool-call grammar and parser, without a model: every output the grammar allows parses, and
streamed fragments join into exactly the arguments read from the whole text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from genserve.runtime.tools import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolCallParser,
    ToolChoice,
    ToolDef,
    ToolsRequest,
    detect_format,
    tool_grammar,
)

PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = (
    ToolDef("get_weather", "the weather", PARAMS),
    ToolDef("noop", None, {"type": "object", "properties": {}, "additionalProperties": False}),
)
TEXTS = {
    HERMES: 'hi <tool_call>\n{"name":"get_weather","arguments":{"city":"a}\\"{","days":2}}\n'
    '</tool_call>\n<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>',
    MISTRAL: 'hi [TOOL_CALLS][{"name":"get_weather","arguments":{"city":"a}\\"{","days":2}},'
    '{"name":"noop","arguments":{}}]',
    LLAMA3_JSON: '{"name":"get_weather","parameters":{"city":"a}\\"{","days":2}};'
    '{"name":"noop","parameters":{}}',
}


def feed_all(
    fmt: str, text: str, cuts: list[int], forced: bool = False, names: tuple[str, ...] = ()
):
    parser = ToolCallParser(fmt, forced, names)
    content, args = "", {}
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for piece in pieces:
        c, calls = parser.feed(piece)
        content += c
        for d in calls:
            args[d.index] = args.get(d.index, "") + d.arguments
    held, calls = parser.finish()
    for d in calls:
        args[d.index] = args.get(d.index, "") + d.arguments
    return content + held, args, parser.tool_calls()


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_split_gives_the_same_calls(fmt: str) -> None:
    text = TEXTS[fmt]
    whole_content, _, whole = feed_all(fmt, text, [])
    assert [c.name for c in whole] == ["get_weather", "noop"]
    assert json.loads(whole[0].arguments) == {"city": 'a}"{', "days": 2}
    assert whole_content == ("" if fmt == LLAMA3_JSON else "hi ")
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        content, args, calls = feed_all(fmt, text, cuts)
        assert content == whole_content
        assert [args[i] for i in range(len(calls))] == [c.arguments for c in whole]


# The forced outputs: markup and calls from the first character.
FORCED = {fmt: text.removeprefix("hi ") for fmt, text in TEXTS.items()}
NAMES = tuple(t.name for t in TOOLS)


def args_at(fmt: str, text: str, call: int) -> int:
    """Where call `call`'s arguments begin in `text`."""
    key = '"parameters":' if fmt == LLAMA3_JSON else '"arguments":'
    at = -1
    for _ in range(call + 1):
        at = text.index(key, at + 1)
    return at + len(key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_forced_call_cut_before_its_arguments_keeps_its_name(fmt: str) -> None:
    """max_tokens can end a forced call in its markup or its `{"name":...` head: it vanished
    (nothing but hidden markup). It comes back named, its arguments empty, once the written
    part of the name fits one function only."""
    text = FORCED[fmt]
    first, second = text.index('"name":"g') + 9, text.index('"name":"n') + 9
    for end in range(1, args_at(fmt, text, 0)):
        _, args, calls = feed_all(fmt, text[:end], [], forced=True, names=("get_weather",))
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", "")], text[:end]
        assert args == {0: ""}
        # Between two functions, only a name written far enough says which.
        _, _, calls = feed_all(fmt, text[:end], [], forced=True, names=NAMES)
        assert [c.name for c in calls] == (["get_weather"] if end >= first else [])
    # The second call of a parallel answer: named once its `{` and enough of it are written.
    for end in range(args_at(fmt, text, 0) + 1, args_at(fmt, text, 1)):
        _, _, calls = feed_all(fmt, text[:end], [], forced=True, names=NAMES)
        assert [c.name for c in calls][1:] == (["noop"] if end >= second else []), text[:end]
    _, _, whole = feed_all(fmt, text, [], forced=True, names=NAMES)
    assert [c.name for c in whole] == ["get_weather", "noop"]


def test_an_auto_call_cut_in_its_head_is_named_once_the_trigger_is_whole() -> None:
    text = TEXTS[HERMES]
    for end in range(1, args_at(HERMES, text, 0)):
        content, _, calls = feed_all(HERMES, text[:end], [], names=("get_weather",))
        whole_trigger = "<tool_call>" in text[:end]
        assert [c.name for c in calls] == (["get_weather"] if whole_trigger else [])
        assert content == (text[:3] if whole_trigger else text[:end])


def test_text_that_only_looks_like_a_trigger_is_content() -> None:
    content, _, calls = feed_all(HERMES, "a <tool_ca b <tool", [3, 9, 15])
    assert content == "a <tool_ca b <tool" and calls == []


def test_format_follows_the_template() -> None:
    assert detect_format("{{ '[TOOL_CALLS]' }}") == MISTRAL
    assert detect_format("<|python_tag|>") == LLAMA3_JSON
    assert detect_format("<tool_call>") == HERMES
    assert detect_format("plain", "mistral") == MISTRAL


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory):
    from genserve.model.grammar import GrammarCompiler
    from tests.tiny_model import build_tokenizer

    tok = build_tokenizer(Path(tmp_path_factory.mktemp("tok")))
    return tok, GrammarCompiler(tok, len(tok))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["required", "function"])
def test_random_walks_of_the_grammar_parse(compiler, fmt: str, mode: str) -> None:
    import jsonschema
    import numpy as np

    tok, gc = compiler
    name = "get_weather" if mode == "function" else None
    spec = tool_grammar(ToolsRequest(TOOLS, ToolChoice(mode, name), parallel=True), fmt)
    for seed in range(20):
        matcher, rng, out = gc.matcher(spec), random.Random(seed), []
        while not matcher.done and len(out) < 400:
            allowed = np.flatnonzero(matcher.allowed_bits())
            token = int(rng.choice(allowed))
            if token == tok.eos_token_id:
                break
            matcher.advance(token)
            out.append(token)
        _, _, calls = feed_all(fmt, tok.decode(out), [], forced=True)
        assert calls
        for call in calls:
            assert mode == "required" or call.name == "get_weather"
            args = json.loads(call.arguments)
            if call.name == "get_weather":
                jsonschema.validate(args, PARAMS)
        if mode == "function":  # cut anywhere (max_tokens), the named call is still there
            for end in range(1, len(out)):
                text = tok.decode(out[:end])
                _, _, cut = feed_all(fmt, text, [], forced=True, names=("get_weather",))
                assert cut and cut[0].name == "get_weather", text


# Draft 7's `definitions`, as older generators write them.
LEGACY = {
    "definitions": {"Color": {"enum": ["blue", "black"]}},
    "type": "object",
    "properties": {"color": {"$ref": "#/definitions/Color"}},
    "required": ["color"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["required", "function"])
def test_refs_to_each_tools_own_defs_hold_in_the_grammar(compiler, fmt: str, mode: str) -> None:
    """Nested under `arguments`, `#/$defs/Color` pointed at nothing (the grammar was refused);
    three tools each with a `Color` of other values: every call matches its own tool's."""
    import jsonschema
    import numpy as np

    from tests.tool_models import SCHEMAS

    tok, gc = compiler
    schemas = {**SCHEMAS, "legacy": LEGACY}
    tools = tuple(ToolDef(name, None, params) for name, params in schemas.items())
    name = "Tint" if mode == "function" else None
    spec = tool_grammar(ToolsRequest(tools, ToolChoice(mode, name), parallel=True), fmt)
    seen = set()
    for seed in range(30):
        matcher, rng, out = gc.matcher(spec), random.Random(seed), []
        while not matcher.done and len(out) < 400:
            token = int(rng.choice(np.flatnonzero(matcher.allowed_bits())))
            if token == tok.eos_token_id:
                break
            matcher.advance(token)
            out.append(token)
        _, _, calls = feed_all(fmt, tok.decode(out), [], forced=True)
        assert calls
        for call in calls:
            assert mode == "required" or call.name == "Tint"
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            seen.add(call.name)
    assert mode == "function" or seen == set(schemas)


def test_only_refs_move_with_a_tool_not_data_that_looks_like_one() -> None:
    from genserve.runtime.tools import calls_schema

    params = {
        "$defs": {"N": {"type": "integer"}},
        "type": "object",
        "properties": {
            "$ref": {"$ref": "#/$defs/N"},  # a property named "$ref"
            "tag": {"const": {"$ref": "#/$defs/N"}, "default": {"$ref": "#"}},
        },
    }
    call, defs = calls_schema([ToolDef("f", None, params)], HERMES)
    assert call["properties"]["arguments"] == {"$ref": "#/$defs/tool0"}
    moved = defs["tool0"]["properties"]
    assert moved["$ref"] == {"$ref": "#/$defs/tool0/$defs/N"}
    assert moved["tag"] == params["properties"]["tag"]
    plain, none = calls_schema([ToolDef("g", None, PARAMS)], HERMES)
    assert plain["properties"]["arguments"] == PARAMS and none == {}
