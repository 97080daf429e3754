"""Grammar-constrained decoding on this CPU: per-token mask cost and JSON-schema coverage.

    python bench/grammar_masks.py                   # every tokenizer, both libraries, coverage
    python bench/grammar_masks.py --vocab 8192      # one tokenizer only
    python bench/grammar_masks.py --skip-coverage   # timings only

For each tokenizer (byte-level BPEs trained on stdlib source with 8192 and 49152 ids, plus
var/bench-models/smollm2-135m-random when it exists) and each library (llguidance, xgrammar),
a nested schema (required keys, enum, array of objects, integer bounds, nested object, pattern)
is compiled, then a valid document is fed token by token: before each token the next-token
bitmask is computed, and that call alone is timed. "cold" is the first pass over a freshly
compiled grammar (lazy lexers build their states here), "warm" the later passes, "1st mask" the
very first mask after compiling. Another busy process shows up as rare multi-millisecond
outliers (preemption), which move the means: read p50/p95 first. "rand" columns time the same
schema under 10 seeded random walks (uniform over the allowed tokens, as a random-weight model
under the mask would behave), which reach the costlier states: long strings of odd tokens.

Coverage feeds, for each JSON-schema feature, one document that satisfies the schema and some
that violate it (checked with jsonschema first): "enforces" = the good one is accepted and every
bad one rejected, "rejects" = the library refuses the schema, "IGNORES" = a bad document passes
(silently unconstrained: the worst outcome), "BROKEN" = the good document is refused. The last
column is what genserve.model.grammar does: "400" = refused with UnsupportedSchemaError. (An
unknown keyword is ignored by both libraries, as JSON Schema says, so their "enforces" there is
about the type beside it; genserve refuses every keyword it has not verified.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_CACHE = REPO_ROOT / "var" / "bench-tokenizers"
SMOLLM_DIR = REPO_ROOT / "var" / "bench-models" / "smollm2-135m-random"
EOS = "<|endoftext|>"
RANDOM_WALKS = 10  # seeded walks per library, uniform over the allowed tokens
RANDOM_CAP = 400  # tokens per walk; every string, array and number in the schema is bounded

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "name": {"type": "string", "maxLength": 40},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 16},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    # cents, bounded: a random walk would extend a float's digits forever
                    "cents": {"type": "integer", "minimum": 0, "maximum": 10000000},
                },
                "required": ["sku", "qty", "cents"],
                "additionalProperties": False,
            },
        },
        "vip": {"type": "boolean"},
    },
    "required": ["id", "name", "status", "address", "orders", "vip"],
    "additionalProperties": False,
}
NESTED_DOC: dict[str, Any] = {
    "id": 4821,
    "name": "Ada Lovelace",
    "status": "active",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10115"},
    "orders": [
        {"sku": "ENG-ANALYTICAL", "qty": 1, "cents": 184350},
        {"sku": "NOTE-G", "qty": 12, "cents": 25},
        {"sku": "PUNCH-CARD", "qty": 99, "cents": 300},
    ],
    "vip": True,
}


# ---------------------------------------------------------------------------- tokenizers


def _stdlib_text(limit_bytes: int = 12_000_000) -> list[str]:
    """Real text for BPE training: the standard library's own source, always on disk."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def trained_tokenizer(vocab_size: int):
    """A byte-level BPE trained on stdlib source, cached under var/ (training takes a while)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = TOKENIZER_CACHE / f"stdlib-bpe-{vocab_size}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(folder))
    return fast


def tokenizers_to_run(vocabs: list[int]) -> list[tuple[str, Any]]:
    from transformers import AutoTokenizer

    out = [(f"stdlib-bpe-{v}", trained_tokenizer(v)) for v in vocabs]
    if SMOLLM_DIR.exists() and (not vocabs or 49152 in vocabs):
        out.append(("smollm2-random-49152", AutoTokenizer.from_pretrained(str(SMOLLM_DIR))))
    return out


# ---------------------------------------------------------------------------- backends


class LlgBackend:
    """llguidance: Earley parser + lazy derivative-based lexer, mask computed per step."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.eos = tokenizer.eos_token_id

    def compile(self, schema: dict[str, Any]):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def start(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def consume(self, matcher, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def finish(self, matcher) -> bool:
        return bool(matcher.consume_token(self.eos)) and not matcher.is_error()


class XgrBackend:
    """xgrammar: pushdown automaton with a token-mask cache precomputed at compile time."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id]
        )
        # One compile thread: the bench compares single-core costs; the cache would hide them.
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.eos = tokenizer.eos_token_id

    def compile(self, schema: dict[str, Any]):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask) -> None:
        matcher.fill_next_token_bitmask(bitmask.view(1, -1))

    def consume(self, matcher, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def finish(self, matcher) -> bool:
        return bool(matcher.accept_token(self.eos))


BACKENDS = (LlgBackend, XgrBackend)


def installed_backends() -> list[type]:
    """xgrammar is a bench-only comparison (pip install xgrammar); a missing one is skipped."""
    from importlib.util import find_spec

    return [cls for cls in BACKENDS if find_spec(cls.name) is not None]


# ---------------------------------------------------------------------------- timing


@dataclass(slots=True)
class Timing:
    tokenizer: str
    library: str
    vocab: int
    doc_tokens: int
    setup_ms: float
    compile_ms: float
    cold_us: list[float] = field(default_factory=list)
    warm_us: list[float] = field(default_factory=list)
    random_us: list[float] = field(default_factory=list)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _timed_pass(backend, compiled, tokens: list[int], bitmask) -> list[float]:
    """One pass over the document: time the mask before each token and before EOS."""
    matcher = backend.start(compiled)
    times: list[float] = []
    for token in [*tokens, None]:
        t0 = time.perf_counter_ns()
        backend.fill(matcher, bitmask)
        times.append((time.perf_counter_ns() - t0) / 1000)
        if token is None:
            break
        if not bitmask_allows(bitmask, token) or not backend.consume(matcher, token):
            raise RuntimeError(f"{backend.name} refused token {token} of the valid document")
    if not backend.finish(matcher):
        raise RuntimeError(f"{backend.name} did not accept EOS after the valid document")
    return times


def _random_pass(backend, compiled, bitmask, vocab: int, seed: int) -> list[float]:
    """A random-weight model's walk: uniform over the allowed tokens, until EOS or the cap."""
    import numpy as np

    rng = random.Random(seed)
    matcher = backend.start(compiled)
    times: list[float] = []
    for _ in range(RANDOM_CAP):
        t0 = time.perf_counter_ns()
        backend.fill(matcher, bitmask)
        times.append((time.perf_counter_ns() - t0) / 1000)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), count=vocab, bitorder="little")
        token = int(rng.choice(bits.nonzero()[0]))
        if token == backend.eos:
            break
        backend.consume(matcher, token)
    return times


def bitmask_allows(bitmask, token: int) -> bool:
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)


def time_library(cls, tok_name: str, tokenizer, reps: int) -> Timing:
    import torch

    vocab = len(tokenizer)
    t0 = time.perf_counter()
    backend = cls(tokenizer, vocab)
    setup_ms = (time.perf_counter() - t0) * 1000
    compile_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        compiled = backend.compile(NESTED_SCHEMA)
        compile_times.append((time.perf_counter() - t0) * 1000)
    text = json.dumps(NESTED_DOC, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    timing = Timing(
        tok_name, cls.name, vocab, len(tokens), setup_ms, statistics.median(compile_times)
    )
    timing.cold_us = _timed_pass(backend, compiled, tokens, bitmask)
    for _ in range(reps):
        timing.warm_us += _timed_pass(backend, compiled, tokens, bitmask)
    for seed in range(RANDOM_WALKS):
        timing.random_us += _random_pass(backend, compiled, bitmask, vocab, seed)
    return timing


def time_genserve(tok_name: str, tokenizer, reps: int) -> Timing | None:
    """The shipped wrapper: mask fill, unpack and the -inf fill of a logits row, per token."""
    try:
        from genserve.model.grammar import GrammarCompiler, GrammarSpec
    except ImportError:
        return None
    import torch

    vocab = len(tokenizer)
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab)
    setup_ms = (time.perf_counter() - t0) * 1000
    spec = GrammarSpec.json_schema(NESTED_SCHEMA)
    t0 = time.perf_counter()
    compiler.matcher(spec)
    compile_ms = (time.perf_counter() - t0) * 1000
    tokens = tokenizer.encode(
        json.dumps(NESTED_DOC, separators=(",", ":")), add_special_tokens=False
    )
    logits = torch.zeros(vocab)
    timing = Timing(tok_name, "genserve apply()", vocab, len(tokens), setup_ms, compile_ms)
    for rep in range(reps + 1):
        matcher = compiler.matcher(spec)
        sink = timing.cold_us if rep == 0 else timing.warm_us
        for token in [*tokens, tokenizer.eos_token_id]:
            t0 = time.perf_counter_ns()
            matcher.apply(logits)
            sink.append((time.perf_counter_ns() - t0) / 1000)
            matcher.advance(token)
    for seed in range(RANDOM_WALKS):
        timing.random_us += _genserve_random_pass(compiler.matcher(spec), vocab, seed)
    return timing


def _genserve_random_pass(matcher, vocab: int, seed: int) -> list[float]:
    import torch

    rng = random.Random(seed)
    times: list[float] = []
    while not matcher.done and len(times) < RANDOM_CAP:
        logits = torch.zeros(vocab)
        t0 = time.perf_counter_ns()
        matcher.apply(logits)
        times.append((time.perf_counter_ns() - t0) / 1000)
        matcher.advance(int(rng.choice(torch.isfinite(logits).nonzero().flatten().tolist())))
    return times


def print_timings(rows: list[Timing]) -> None:
    head = (
        f"{'tokenizer':<22} {'library':<17} {'vocab':>6} {'toks':>5} {'setup ms':>9} "
        f"{'compile ms':>10} {'cold mean':>9} {'warm mean':>9} {'warm p50':>9} "
        f"{'warm p95':>9} {'1st mask':>8} {'rand mean':>9} {'rand p50':>9} {'rand p95':>9}"
    )
    print("\nper-token mask time (microseconds), compile = schema -> ready matcher (median of 5)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.tokenizer:<22} {r.library:<17} {r.vocab:>6} {r.doc_tokens:>5} "
            f"{r.setup_ms:>9.1f} {r.compile_ms:>10.2f} {statistics.mean(r.cold_us):>9.1f} "
            f"{statistics.mean(r.warm_us):>9.1f} {statistics.median(r.warm_us):>9.1f} "
            f"{_p95(r.warm_us):>9.1f} {r.cold_us[0]:>8.0f} {statistics.mean(r.random_us):>9.1f} "
            f"{statistics.median(r.random_us):>9.1f} {_p95(r.random_us):>9.1f}"
        )


# ---------------------------------------------------------------------------- coverage


def _wrap(sub: dict[str, Any]) -> dict[str, Any]:
    """A feature under test sits in property "v" of a closed object (top level is an object)."""
    return {
        "type": "object",
        "properties": {"v": sub},
        "required": ["v"],
        "additionalProperties": False,
    }


@dataclass(frozen=True, slots=True)
class Case:
    feature: str
    schema: dict[str, Any]
    good: Any
    bad: tuple[Any, ...]


def _v(feature: str, sub: dict[str, Any], good: Any, *bad: Any) -> Case:
    return Case(feature, _wrap(sub), {"v": good}, tuple({"v": b} for b in bad))


_TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["n"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}

CASES: tuple[Case, ...] = (
    _v("minimum/maximum", {"type": "integer", "minimum": 3, "maximum": 7}, 5, 2, 8, 70),
    _v(
        "exclusiveMinimum/Maximum",
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        0.5,
        0,
        10,
        -1,
    ),
    _v(
        "minLength/maxLength",
        {"type": "string", "minLength": 2, "maxLength": 4},
        "abc",
        "a",
        "abcde",
    ),
    _v(
        "pattern",
        {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
        "abc-12",
        "abc-1x",
        "ABC-12",
        "abc-123",
    ),
    _v(
        "format: date-time",
        {"type": "string", "format": "date-time"},
        "2024-05-06T07:08:09Z",
        "yesterday",
        "2024-05-06",
    ),
    _v(
        "format: email",
        {"type": "string", "format": "email"},
        "ada@example.com",
        "not-an-email",
        "ada.example.com",
    ),
    _v(
        "format: uuid",
        {"type": "string", "format": "uuid"},
        "123e4567-e89b-12d3-a456-426614174000",
        "123e4567",
        "zzze4567-e89b-12d3-a456-426614174000",
    ),
    _v("enum", {"enum": ["red", "green", 1]}, "green", "blue", 2),
    _v("const", {"const": "x"}, "x", "y"),
    _v(
        "anyOf",
        {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]},
        "ab",
        "abc",
        True,
    ),
    _v("oneOf (disjoint)", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, 1, True),
    _v("oneOf (overlapping)", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1.5, 1),
    _v("allOf", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 5}]}, 3, 6, -1),
    Case(
        "$ref/$defs (recursive)",
        _TREE,
        {"n": 1, "kids": [{"n": 2, "kids": [{"n": 3}]}]},
        ({"n": 1, "kids": [{"m": 2}]}, {"n": 1, "kids": [{"n": "x"}]}),
    ),
    Case(
        "additionalProperties: false",
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        ({"a": 1, "b": 2},),
    ),
    _v(
        "minItems/maxItems",
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        [1],
        [],
        [1, 2, 3],
    ),
    _v(
        "uniqueItems",
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [1, 2],
        [1, 1],
    ),
    _v("not", {"type": ["integer", "string"], "not": {"type": "string"}}, 1, "a"),
    Case(
        "if/then/else",
        {
            "type": "object",
            "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
            "required": ["k", "n"],
            "additionalProperties": False,
            "if": {"properties": {"k": {"const": "a"}}},
            "then": {"properties": {"n": {"maximum": 0}}},
            "else": {"properties": {"n": {"minimum": 10}}},
        },
        {"k": "a", "n": 0},
        ({"k": "a", "n": 5}, {"k": "b", "n": 5}),
    ),
    Case(
        "patternProperties",
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"x_a": 1},
        ({"y": 1}, {"x_a": "s"}),
    ),
    _v("multipleOf", {"type": "integer", "multipleOf": 3}, 6, 7, 1),
    _v(
        "minProperties/maxProperties",
        {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "minProperties": 1,
            "maxProperties": 2,
        },
        {"a": 1},
        {},
        {"a": 1, "b": 2, "c": 3},
    ),
    _v(
        "contains",
        {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}, "maxItems": 3},
        [1, 5],
        [1, 2],
    ),
    _v(
        "propertyNames",
        {
            "type": "object",
            "propertyNames": {"pattern": "^[a-z]+$"},
            "additionalProperties": {"type": "integer"},
        },
        {"ab": 1},
        {"A1": 1},
    ),
    _v(
        "dependentRequired",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
            "additionalProperties": False,
        },
        {"a": 1, "b": 2},
        {"a": 1},
    ),
    _v("unknown keyword (x-foo)", {"type": "integer", "x-foo": 1}, 1, "s"),
)


_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _check_case(case: Case) -> None:
    """The cases themselves must be right, or the table measures nothing."""
    import jsonschema

    checker = jsonschema.FormatChecker()
    # jsonschema checks date-time only with an optional extra installed; RFC 3339 by regex here.
    checker.checks("date-time")(lambda s: not isinstance(s, str) or bool(_DATE_TIME.match(s)))
    validator = jsonschema.Draft202012Validator(case.schema, format_checker=checker)
    if not validator.is_valid(case.good):
        raise RuntimeError(f"{case.feature}: good document is invalid")
    for bad in case.bad:
        if validator.is_valid(bad):
            raise RuntimeError(f"{case.feature}: bad document {bad!r} is valid")


def _accepts(backend, compiled, tokenizer, doc: Any) -> bool:
    matcher = backend.start(compiled)
    text = json.dumps(doc, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return all(backend.consume(matcher, t) for t in tokens) and backend.finish(matcher)


def library_verdict(backend, tokenizer, case: Case) -> str:
    try:
        compiled = backend.compile(case.schema)
    except Exception:  # any refusal at compile time is the verdict
        return "rejects"
    if not _accepts(backend, compiled, tokenizer, case.good):
        return "BROKEN"
    if any(_accepts(backend, compiled, tokenizer, bad) for bad in case.bad):
        return "IGNORES"
    return "enforces"


def genserve_verdict(make: Callable[[], Any] | None, tokenizer, case: Case) -> str:
    if make is None:
        return "-"
    from genserve.model.grammar import GrammarSpec, UnsupportedSchemaError

    compiler = make()
    spec = GrammarSpec.json_schema(case.schema)
    try:
        compiler.validate(spec)
    except UnsupportedSchemaError:
        return "400"

    def accepts(doc: Any) -> bool:
        matcher = compiler.matcher(spec)
        tokens = tokenizer.encode(json.dumps(doc, separators=(",", ":")), add_special_tokens=False)
        try:
            for t in [*tokens, tokenizer.eos_token_id]:
                matcher.advance(t)
        except ValueError:
            return False
        return True

    if not accepts(case.good):
        return "BROKEN"
    return "IGNORES" if any(accepts(b) for b in case.bad) else "enforces"


def _genserve_factory(tokenizer) -> Callable[[], Any] | None:
    try:
        from genserve.model.grammar import GrammarCompiler
    except ImportError:
        return None
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    return lambda: compiler


def print_coverage(tokenizer) -> None:
    backends = [cls(tokenizer, len(tokenizer)) for cls in installed_backends()]
    make = _genserve_factory(tokenizer)
    names = [b.name for b in backends] + ["genserve"]
    print(f"\nschema coverage (tokenizer vocab {len(tokenizer)})")
    head = f"{'feature':<30}" + "".join(f"{n:>12}" for n in names)
    print(head)
    print("-" * len(head))
    for case in CASES:
        _check_case(case)
        cells = [library_verdict(b, tokenizer, case) for b in backends]
        cells.append(genserve_verdict(make, tokenizer, case))
        print(f"{case.feature:<30}" + "".join(f"{c:>12}" for c in cells))


# ---------------------------------------------------------------------------- main


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} (not installed)"

    return ", ".join(one(p) for p in ("llguidance", "xgrammar", "torch"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=[8192, 49152])
    parser.add_argument("--reps", type=int, default=30, help="warm passes over the document")
    parser.add_argument("--skip-coverage", action="store_true")
    args = parser.parse_args()
    import torch

    # One core for everyone: the engine calls the mask from its single loop thread.
    torch.set_num_threads(1)
    print(f"{versions()}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    toks = tokenizers_to_run(args.vocab)
    rows: list[Timing] = []
    for name, tok in toks:
        rows += [time_library(cls, name, tok, args.reps) for cls in installed_backends()]
        shipped = time_genserve(name, tok, args.reps)
        rows += [shipped] if shipped else []
    print_timings(rows)
    if not args.skip_coverage:
        print_coverage(toks[0][1])


if __name__ == "__main__":
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    main()
