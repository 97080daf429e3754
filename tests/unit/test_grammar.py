"""Grammar-constrained decoding: a random model under the mask always yields valid JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from genserve.model.grammar import (
    GrammarCompiler,
    GrammarMatcher,
    GrammarSpec,
    TokenizerJSON,
    UnsupportedSchemaError,
)
from tests.tiny_model import build_tokenizer

MAX_TOKENS = 400
PADDING = 13  # model heads are often wider than the tokenizer; those ids must never be allowed

# Every string, array and integer is bounded, so every path through it ends.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 500},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "minLength": 1, "maxLength": 8},
                    "qty": {"type": "integer", "minimum": -5, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "vip": {"type": "boolean"},
    },
    "required": ["id", "status", "address", "orders", "vip"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("grammar-tok"))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer) + PADDING)


def vocab(tokenizer) -> int:
    return len(tokenizer) + PADDING


def sample_under_mask(matcher: GrammarMatcher, size: int, seed: int) -> list[int]:
    """A flat random model: uniform over whatever the mask allows, as the sampler would see."""
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while not matcher.done and len(tokens) < MAX_TOKENS:
        logits = torch.zeros(size)
        matcher.apply(logits)
        token = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=gen))
        matcher.advance(token)
        tokens.append(token)
    return tokens


def feed(matcher: GrammarMatcher, tokenizer, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        matcher.advance(token)


def test_random_model_under_schema_mask_always_yields_valid_documents(compiler, tokenizer):
    spec = GrammarSpec.json_schema(SCHEMA)
    compiler.validate(spec)
    eos = tokenizer.eos_token_id
    for seed in range(100):
        matcher = compiler.matcher(spec)
        tokens = sample_under_mask(matcher, vocab(tokenizer), seed)
        assert matcher.done, f"seed {seed}: not finished in {MAX_TOKENS} tokens"
        assert eos not in tokens  # EOS cannot come before the value is complete
        doc = json.loads(tokenizer.decode(tokens))
        jsonschema.validate(doc, SCHEMA)
        # Properties come in the order the schema lists them, as OpenAI returns them.
        assert list(doc) == list(SCHEMA["properties"])
        # Once done only EOS remains, and it is accepted.
        assert matcher.allowed().nonzero().flatten().tolist() == [eos]
        matcher.advance(eos)


def test_a_compiler_from_the_pickled_tokenizer_masks_as_the_tokenizer_s_own(compiler, tokenizer):
    """The grammar helper builds its compiler from TokenizerJSON, pickled across processes
    (no transformers there): the same tokens allowed at every step of the same run."""
    import pickle

    sent = pickle.loads(pickle.dumps(TokenizerJSON.of(tokenizer)))
    assert (sent.size, sent.eos_token_id) == (len(tokenizer), tokenizer.eos_token_id)
    theirs = GrammarCompiler(sent, vocab(tokenizer))
    spec = GrammarSpec.json_schema(SCHEMA)
    ours_m, theirs_m = compiler.matcher(spec), theirs.matcher(spec)
    for token in sample_under_mask(compiler.matcher(spec), vocab(tokenizer), seed=3):
        assert torch.equal(ours_m.allowed(), theirs_m.allowed())
        ours_m.advance(token)
        theirs_m.advance(token)
    assert ours_m.done and theirs_m.done
    with pytest.raises(ValueError, match="fast tokenizers"):
        TokenizerJSON.of(object())  # a slow tokenizer has no Rust side to serialize


def test_json_object_allows_any_object_and_only_an_object(compiler, tokenizer):
    spec = GrammarSpec.json_object()
    text = '{"a":[1,-2.5e3,{"b":null}],"c":"x y","d":{},"e":true}'
    matcher = compiler.matcher(spec)
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert not matcher.done
        assert not matcher.allowed()[tokenizer.eos_token_id]
        matcher.advance(token)
    assert matcher.done
    assert matcher.allowed()[tokenizer.eos_token_id]
    for not_an_object in ("[1]", '"x"', "1", " {}"):
        with pytest.raises(ValueError, match="not allowed"):
            feed(compiler.matcher(spec), tokenizer, not_an_object)


def test_json_object_random_runs_that_finish_are_objects(compiler, tokenizer):
    spec = GrammarSpec.json_object()
    for seed in range(10):
        matcher = compiler.matcher(spec)
        tokens = sample_under_mask(matcher, vocab(tokenizer), seed)
        if matcher.done:  # free-form JSON may legitimately run past the cap
            assert isinstance(json.loads(tokenizer.decode(tokens)), dict)


def run_to_end(compiler, tokenizer, spec: GrammarSpec, seed: int) -> str:
    """A flat random model under the mask until the grammar is complete or EOS is drawn."""
    matcher = compiler.matcher(spec)
    tokens = sample_under_mask(matcher, vocab(tokenizer), seed)
    eos = tokenizer.eos_token_id
    assert matcher.done or tokens[-1] == eos, f"seed {seed}: not finished"
    return tokenizer.decode([t for t in tokens if t != eos])


def test_a_regex_constrains_the_whole_output(compiler, tokenizer):
    spec = GrammarSpec.regex(r"[a-z]{2,5}-[0-9]{3}( ok)?")
    outputs = {run_to_end(compiler, tokenizer, spec, seed) for seed in range(30)}
    assert all(re.fullmatch(r"[a-z]{2,5}-[0-9]{3}( ok)?", o) for o in outputs), outputs
    assert len(outputs) > 10


def test_a_choice_gives_exactly_one_option_whatever_its_characters(compiler, tokenizer):
    options = ["yes", "no way", 'say "hi"\\n', "日本 😀", "a/b|c"]
    spec = GrammarSpec.choice(options)
    outputs = {run_to_end(compiler, tokenizer, spec, seed) for seed in range(40)}
    assert outputs == set(options)


@pytest.mark.parametrize(
    "grammar",
    [
        'start: NUM "+" NUM\nNUM: /[0-9]{1,3}/',  # Lark
        'root ::= num "+" num\nnum ::= [0-9] | [0-9] [0-9]',  # GBNF, as vLLM's xgrammar reads
    ],
)
def test_a_grammar_in_lark_or_gbnf_constrains_the_output(compiler, tokenizer, grammar):
    spec = GrammarSpec.grammar(grammar)
    for seed in range(10):
        assert re.fullmatch(r"[0-9]{1,3}\+[0-9]{1,3}", run_to_end(compiler, tokenizer, spec, seed))


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        (GrammarSpec.regex("(unclosed"), "regex"),
        (GrammarSpec.grammar("start: undefined_rule"), "grammar"),
        (GrammarSpec.grammar("root ::= ("), "grammar"),
    ],
)
def test_a_bad_regex_or_grammar_is_refused_saying_which(compiler, spec, word):
    with pytest.raises(UnsupportedSchemaError) as e:
        compiler.validate(spec)
    assert str(e.value).startswith(word) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("keyword", "sub"),
    [
        ("uniqueItems", {"type": "array", "uniqueItems": True}),
        ("not", {"not": {"type": "string"}}),
        ("if", {"if": {"minimum": 1}, "then": {"maximum": 3}}),
        ("contains", {"type": "array", "contains": {"const": 1}}),
        ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
        ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
        ("nullable", {"type": "integer", "nullable": True}),
        (
            "additionalItems",
            {"type": "array", "items": [{"type": "integer"}], "additionalItems": False},
        ),
        ("contentEncoding", {"type": "string", "contentEncoding": "base64"}),
        ("x-guidance", {"type": "integer", "x-guidance": {"lenient": True}}),
        ("int32", {"type": "integer", "format": "int32"}),
        ("format", {"type": "string", "format": ["date"]}),
        ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),  # overlap: not exclusive
    ],
)
def test_unenforceable_schema_is_refused_naming_the_keyword(compiler, keyword, sub):
    schema = {"type": "object", "properties": {"v": {"type": "array", "items": sub}}}
    spec = GrammarSpec.json_schema(schema)
    with pytest.raises(UnsupportedSchemaError, match=keyword):
        compiler.validate(spec)
    with pytest.raises(ValueError, match=keyword):  # the API maps ValueError to 400 too
        compiler.matcher(spec)


def test_unsupported_keyword_message_says_where(compiler):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.validate(GrammarSpec.json_schema(schema))
    assert "'uniqueItems' at #/properties/tags" in str(info.value)


def test_disallowed_token_makes_advance_raise_and_leaves_state(compiler, tokenizer):
    spec = GrammarSpec.json_schema(SCHEMA)
    matcher = compiler.matcher(spec)
    feed(matcher, tokenizer, '{"id":')
    allowed = matcher.allowed()
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    assert not allowed[letter]
    for bad in (letter, tokenizer.eos_token_id, len(tokenizer) + 1, vocab(tokenizer), -1):
        with pytest.raises(ValueError, match="not allowed"):
            matcher.advance(bad)
    # The refused tokens changed nothing: the document continues where it was.
    feed(matcher, tokenizer, '42,"status":"banned","address":{"city":"","zip":"01234"},')
    feed(matcher, tokenizer, '"orders":[{"sku":"a","qty":-5}],"vip":false}')
    assert matcher.done


def test_integer_bounds_are_enforced_digit_by_digit(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    feed(matcher, tokenizer, '{"id":50')
    with pytest.raises(ValueError):
        feed(matcher, tokenizer, "1")  # 501 > maximum 500


def test_apply_sets_exactly_the_disallowed_logits_to_minus_inf(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    feed(matcher, tokenizer, '{"id":7,"status":"')
    allowed = matcher.allowed()
    assert allowed.dtype == torch.bool and allowed.shape == (vocab(tokenizer),)
    assert not allowed[len(tokenizer) :].any()
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(vocab(tokenizer)).to(dtype)
        before = logits.clone()
        matcher.apply(logits)
        assert torch.equal(logits[allowed], before[allowed])
        assert torch.equal(logits[~allowed], torch.full_like(logits[~allowed], float("-inf")))
    with pytest.raises(ValueError):
        matcher.apply(torch.zeros(len(tokenizer)))


def test_specs_are_hashable_and_compiled_once(compiler):
    a = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert a == b and hash(a) == hash(b) and a != GrammarSpec.json_object()
    assert compiler.matcher(a) is not compiler.matcher(b)  # separate states, one grammar
    with pytest.raises(ValueError):
        GrammarSpec("json_schema", None)
    with pytest.raises(ValueError):
        GrammarSpec("regex", "a+")


def test_one_spec_asked_for_at_once_is_compiled_once(tokenizer):
    """Eight threads ask for the same new schema together (a hostile caller sending it again
    while it compiles): one compile, and each gets the same answer."""
    compiler = GrammarCompiler(tokenizer, vocab(tokenizer))
    compiled = []
    compile_one = compiler._compile

    def counted(spec, text=None):
        compiled.append(spec)
        return compile_one(spec, text)

    compiler._compile = counted  # counts the real compiles; nothing is replaced
    spec = GrammarSpec.json_schema(SCHEMA)
    start = threading.Barrier(8)

    def ask() -> str:
        start.wait()
        return type(compiler.matcher(spec)).__name__

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(), range(8)))
    assert answers == ["GrammarMatcher"] * 8
    assert compiled == [spec]


def test_schema_that_is_not_an_object_is_refused(compiler):
    with pytest.raises(UnsupportedSchemaError, match="JSON object"):
        compiler.validate(GrammarSpec("json_schema", "[1, 2]"))
    with pytest.raises(UnsupportedSchemaError, match="not JSON"):
        compiler.validate(GrammarSpec("json_schema", "{"))


def test_spec_and_error_import_without_torch():
    # api/ and engine/ build GrammarSpec and catch UnsupportedSchemaError; they never load torch.
    code = (
        "import sys; from genserve.model.grammar import GrammarSpec, UnsupportedSchemaError; "
        "GrammarSpec.json_object(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prepare_parses_once_and_validate_compiles_what_it_gave(tokenizer):
    compiler = GrammarCompiler(tokenizer, vocab(tokenizer))
    spec = GrammarSpec.json_schema(SCHEMA)
    text = compiler.prepare(spec)
    assert isinstance(text, str) and text
    compiler.validate(spec, text)
    assert compiler.prepare(spec) is None  # compiled: nothing to parse again
    assert type(compiler.matcher(spec)).__name__ == "GrammarMatcher"
    with pytest.raises(UnsupportedSchemaError, match="not JSON"):
        compiler.prepare(GrammarSpec("json_schema", "{"))


def test_the_api_parses_at_normal_priority_and_compiles_on_the_background_pool(tokenizer):
    """In-process checks (an engine on a thread of the API's): the schema's parse holds the
    GIL; on the low-priority pool it held it while that thread waited for a core, and the
    engine thread waited with it (see GrammarCompiler.prepare)."""
    import asyncio

    from genserve.runtime.grammar_check import LocalChecks

    compiler = GrammarCompiler(tokenizer, vocab(tokenizer))
    threads: dict[str, str] = {}
    prepare, validate = compiler.prepare, compiler.validate

    def on(name, fn):
        def call(*args):
            threads[name] = threading.current_thread().name
            return fn(*args)

        return call

    compiler.prepare, compiler.validate = on("prepare", prepare), on("validate", validate)
    checks = LocalChecks(compiler)
    try:
        asyncio.run(checks.check(GrammarSpec.json_schema(SCHEMA)))
    finally:
        checks.close()
    assert threads["validate"].startswith("genserve-bg")
    assert not threads["prepare"].startswith("genserve-bg")
    assert compiler.compiled(GrammarSpec.json_schema(SCHEMA))


def test_the_grammar_helper_leaves_when_the_server_it_was_started_for_is_gone() -> None:
    """The helper watches the server's pid as the server gave it: a helper whose server died
    while it started (so getppid() was already init) must leave too, not watch init."""
    code = (
        "import sys, time\n"
        "from genserve.runtime.grammar_check import _exit_with_parent\n"
        "_exit_with_parent(int(sys.argv[1]), every_s=0.05)\n"
        "time.sleep(20)\n"
    )
    gone = subprocess.Popen([sys.executable, "-c", code, "999999999"])  # no such process
    assert gone.wait(timeout=15) == 0
    alive = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())])  # its parent
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            alive.wait(timeout=3)
    finally:
        alive.kill()
        alive.wait()


def test_the_longest_choice_list_the_api_takes_compiles(compiler: GrammarCompiler) -> None:
    from genserve.api.schemas import MAX_CHOICES

    spec = GrammarSpec.choice([f"label {i}" for i in range(MAX_CHOICES)])
    compiler.validate(spec)  # raises (a 400 at the edge) when it cannot be enforced
    assert compiler.compiled(spec)
