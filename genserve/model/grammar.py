"""Grammar-constrained decoding for `response_format` (any JSON object, or a JSON schema), tool
calls (a Lark grammar) and vLLM's structured outputs (a schema, a regex, a choice, a grammar).

The API edge turns `response_format` into a `GrammarSpec` and calls `GrammarCompiler.validate`
(an `UnsupportedSchemaError` becomes a 400); the engine asks `GrammarCompiler.matcher` for one
`GrammarMatcher` per request, the sampler calls `apply(logits_row)` before it samples, and the
engine calls `advance(token)` after, and stops with finish_reason "stop" once `done`.

Why llguidance. `python bench/grammar_masks.py` on the 2-core dev CPU (load 2.7: another job
held one core), one thread, llguidance 1.9.1 vs xgrammar 0.2.9; a nested schema (required keys,
enum, array of objects, integer bounds, nested object, pattern) fed a valid 115-151 token
document ("doc": warm passes) and walked by 10 seeded uniform-random samplers under the mask
("rand"); mask time per token in microseconds, compile in ms; rare 4-8 ms preemption outliers
inflate means, so medians and p95 are quoted:

    tokenizer (vocab)        library      compile  doc p50  doc p95  rand mean  rand p95  1st mask
    stdlib BPE (8192)        llguidance     0.86      5.2     12.9      11.9       59      1195
    stdlib BPE (8192)        xgrammar       2.3       1.6      8.2       3.1        8.5     150
    stdlib BPE (49152)       llguidance     0.66      9.6    198        56        229       126
    stdlib BPE (49152)       xgrammar      10.3       1.9     58        28         63        61
    smollm2-random (49152)   llguidance     0.80      9.7     25        49        137       132
    smollm2-random (49152)   xgrammar       8.7       1.7     16         8.9       18        59
    smollm2-random (49152)   this module    1.2      32      130        84        172       350

("this module" = `apply()`: mask, unpack and -inf fill of a float32 logits row; tokenizer setup
is 0.3-0.6 s for 49152 ids, once per model.)

xgrammar is faster per token and llguidance compiles faster; either costs far less than one
forward pass of even a 135M model on this CPU (milliseconds), so coverage decides. xgrammar
silently ignores allOf, uniqueItems, not, if/then/else, contains, dependentRequired and
overlapping oneOf (and refuses valid patternProperties documents); llguidance enforces each
feature or refuses the schema. What llguidance itself accepts without enforcing (keywords it
does not know, e.g. `nullable`, `additionalItems`, `contentEncoding`, `x-guidance`, or a
`format` on a number) is refused here by an allowlist before compiling.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from copy import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genserve.engine.types import (  # noqa: F401 - re-exported
    CHOICE,
    COMPACT_JSON,
    GRAMMAR,
    JSON_OBJECT,
    JSON_SCHEMA,
    LARK,
    REGEX,
    GrammarSpec,
    ThinkFirst,
    UnsupportedSchemaError,
)

# torch, numpy and llguidance are imported where they are used: api/ and engine/ import
# GrammarSpec and UnsupportedSchemaError from here and must stay free of torch (DESIGN.md).
if TYPE_CHECKING:
    import llguidance
    import numpy as np
    import torch


# Keywords llguidance enforces (each checked against violating documents by the bench).
_ENFORCED = frozenset(
    {
        "type",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "properties",
        "additionalProperties",
        "patternProperties",
        "required",
        "minProperties",
        "maxProperties",
    }
)
# Keywords that constrain nothing by themselves ($defs are checked where they are walked into;
# a discriminator only names the property its oneOf already constrains).
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
    }
)
# llguidance enforces these formats and refuses other names, but ignores any format on a
# non-string (e.g. OpenAPI's "int32"), so the name is checked here whatever the type.
_FORMATS = frozenset(
    {
        "date-time",
        "time",
        "date",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uuid",
        "uri",
    }
)
_HINTS = {
    "nullable": '; use "type": [..., "null"] (nullable is OpenAPI 3.0)',
    "additionalItems": '; use "prefixItems" with "items" (additionalItems is draft 7)',
}
# llguidance's wording names its own options, which callers cannot set.
_REWORDED = {
    "oneOf constraints are not supported. Enable 'coerce_one_of' option to approximate oneOf "
    "with anyOf": "'oneOf' whose branches may overlap is not supported; use 'anyOf'",
}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")

# Overrides beat a schema's own "x-guidance" key (which the allowlist refuses anyway).
_JSON_OPTIONS = COMPACT_JSON
_ANY_OBJECT = '{"type":"object"}'
# llguidance's own limits, spelled out so they are documented and deliberate (its defaults).
# Fuel is its unit of lexer work, about 100 ns a point: a grammar may spend ~100 ms building
# its lexer and ~20 ms per token; past that the matcher errs instead of stalling the engine.
PARSER_LIMITS = {
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
    "step_max_items": 50_000,
}
# Tokens the compile-time probe walks (the lowest allowed id each step): a pattern whose lexer
# runs out of fuel at its first tokens is a 400 at request time, not a failure mid-decode.
PROBE_STEPS = 8
_MAX_ERROR_CHARS = 300
# -inf as float32 bits: (allowed - 1) & this is 0.0 for an allowed token and -inf otherwise.
_NEG_INF_BITS = -8388608  # 0xFF800000


@dataclass(frozen=True, slots=True)
class TokenizerJSON:
    """A fast tokenizer as llguidance reads it: its Rust side serialized (added tokens from
    tokenizer_config.json included), its length and EOS. It pickles, so the grammar helper
    process builds its compiler without importing transformers and torch (7 s of CPU and
    ~300 MB per server, for a tokenizer the API process had already loaded)."""

    text: str
    size: int  # len(tokenizer): added tokens included
    eos_token_id: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerJSON:  # noqa: ANN401 - a transformers tokenizer
        """What llguidance.hf.from_tokenizer reads of a transformers fast tokenizer;
        ValueError for a slow (Python) one, which llguidance cannot read."""
        if isinstance(tokenizer, TokenizerJSON):
            return tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("only fast tokenizers are supported")
        backend = copy(backend)  # as llguidance.hf does: no padding or truncation in the copy
        backend.no_padding()
        backend.no_truncation()
        return cls(backend.to_str(), len(tokenizer), tokenizer.eos_token_id)


class GrammarCompiler:
    """Compiles specs against one tokenizer; thread-safe (API edge validates, engine matches).
    `tokenizer`: a transformers fast tokenizer, or its TokenizerJSON."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        cache_size: int = 64,
    ) -> None:
        import llguidance

        tok = TokenizerJSON.of(tokenizer)
        stops = list(stop_token_ids or [tok.eos_token_id])
        if None in stops:
            raise ValueError("the tokenizer has no EOS token, which ends a constrained output")
        self.vocab_size = vocab_size
        # llguidance needs a mask at least as wide as the tokenizer; ids past the model's
        # logits (added tokens the head lacks) are cut off when the mask is read.
        self._width = max(vocab_size, tok.size)
        self._tok = llguidance.LLTokenizer(tok.text, n_vocab=self._width, eos_token=stops)
        self._limits = llguidance.LLParserLimits(verbose_errors=False, **PARSER_LIMITS)
        self._stops = frozenset(stops)
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher | str] = OrderedDict()
        self._cache_size = cache_size
        self._compiling: dict[GrammarSpec, threading.Event] = {}  # set when its compile ends
        self._lock = threading.Lock()

    def prepare(self, spec: GrammarSpec) -> str | None:
        """The grammar text `validate` would compile (the schema parsed and checked), or None
        when `spec` is already compiled or refused. UnsupportedSchemaError for a bad schema.

        Separate because this part is Python holding the GIL (json.loads of a 1 MB schema is
        one C call that never lets go), while llguidance's compile drops it: the API runs this
        at normal priority and only the compile on its low-priority threads. Run there, the
        parse held the GIL for 0.5-0.7 s at a time while the scheduler gave its thread no core,
        and the engine thread, waiting for the GIL, took no new request meanwhile (bench/load.py
        --hostile: the streams' TTFT 4-5x their baseline)."""
        with self._lock:
            if spec in self._cache:
                return None
        return _grammar_text(spec)

    def compiled(self, spec: GrammarSpec) -> bool:
        """Whether `spec` is in the cache (compiled, or refused): `matcher` will not compile."""
        with self._lock:
            return spec in self._cache

    def validate(self, spec: GrammarSpec, text: str | None = None) -> None:
        """Raise UnsupportedSchemaError unless `spec` can be enforced; compiles and caches.
        Takes milliseconds to seconds: the API runs it off the event loop, with a budget.
        `text`: what `prepare` gave for this spec, not parsed again."""
        self._template(spec, text)

    def refuse(self, spec: GrammarSpec, message: str) -> None:
        """Remember `spec` as refused (it ran past the API's compile budget), so neither the
        same request nor the engine thread compiles it again."""
        with self._lock:
            self._cache[spec] = message

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        template = self._template(spec)
        with self._lock:  # a copy shares the compiled grammar; cheap (about a microsecond)
            inner = template.deep_copy()
        return GrammarMatcher(inner, self.vocab_size, self._width)

    def _template(self, spec: GrammarSpec, text: str | None = None) -> llguidance.LLMatcher:
        hit = self._cached_or_compile(spec, text)
        if isinstance(hit, str):  # a refused spec is cached too: the same bad request repeats
            raise UnsupportedSchemaError(hit)
        return hit

    def _cached_or_compile(
        self, spec: GrammarSpec, text: str | None = None
    ) -> llguidance.LLMatcher | str:
        """The cached result, else one compile per spec at a time: a caller asking for a spec
        that another thread is compiling waits for that compile instead of starting its own
        (a hostile schema sent twice at once cost two seconds-long compiles of CPU)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            running = self._compiling.get(spec)
            if running is None:
                self._compiling[spec] = running = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            running.wait()
            with self._lock:
                hit = self._cache.get(spec)
            return hit if hit is not None else self._cached_or_compile(spec, text)  # evicted
        try:
            return self._store(spec, self._compile(spec, text))  # unlocked: llguidance drops GIL
        finally:
            with self._lock:
                del self._compiling[spec]
            running.set()

    def _store(
        self, spec: GrammarSpec, hit: llguidance.LLMatcher | str
    ) -> llguidance.LLMatcher | str:
        with self._lock:
            # A refusal recorded meanwhile (the compile ran past its budget) stays.
            hit = self._cache.setdefault(spec, hit)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return hit

    def _compile(self, spec: GrammarSpec, text: str | None = None) -> llguidance.LLMatcher | str:
        import llguidance

        what = _what(spec)
        try:
            grammar = text if text is not None else _grammar_text(spec)
        except UnsupportedSchemaError as exc:
            return str(exc)
        matcher = llguidance.LLMatcher(self._tok, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            return f"{what} cannot be enforced: {_short(matcher.get_error())}"
        problem = self._probe(matcher)
        if problem is not None:
            return f"{what} exceeds the grammar's limits: {problem}"
        return matcher

    def _probe(self, template: llguidance.LLMatcher) -> str | None:
        """Walk a copy a few tokens (the lowest allowed id, EOS aside) under llguidance's
        limits; the error if its lexer cannot keep up (e.g. a pattern like (x{1000}){1000})."""
        import numpy as np

        probe = GrammarMatcher(template.deep_copy(), self.vocab_size, self._width)
        try:
            for _ in range(PROBE_STEPS):
                bits = probe.allowed_bits().copy()
                bits[[t for t in self._stops if t < len(bits)]] = 0
                if not bits.any():
                    return None
                probe.advance(int(np.argmax(bits)))
        except GrammarLimitError as e:
            return _short(e)
        return None


class GrammarMatcher:
    """One request's position in its grammar. Not thread-safe: the engine loop owns it."""

    def __init__(self, inner: llguidance.LLMatcher, vocab_size: int, width: int) -> None:
        import numpy as np

        self._inner = inner
        self._vocab_size = vocab_size
        # numpy, not torch: the grammar helper process checks schemas without importing torch.
        self._bitmask = np.zeros((width + 31) // 32, dtype=np.int32)
        self._bits: np.ndarray | None = None  # uint8 0/1 per token, for the current state

    def allowed_bits(self) -> np.ndarray:
        """uint8 0/1 [vocab_size]: tokens allowed next. Shared: do not modify."""
        return self._mask_bits()

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: tokens allowed next. Shared with the matcher: do not modify."""
        import torch

        return torch.from_numpy(self._mask_bits()).view(torch.bool)

    def apply(self, logits_row: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place."""
        import numpy as np
        import torch

        if logits_row.shape != (self._vocab_size,):
            raise ValueError(f"logits row {tuple(logits_row.shape)} != ({self._vocab_size},)")
        bits = self._mask_bits()
        if logits_row.device.type != "cpu":
            allowed = torch.from_numpy(bits).view(torch.bool).to(logits_row.device)
            logits_row.masked_fill_(~allowed, float("-inf"))
            return
        # Adding a 0/-inf row is branch-free, 3-10x faster than masked_fill_ on CPU; numpy runs
        # it on this thread, where torch would hand a 50k row to OpenMP (ms when cores are busy).
        bias = ((bits.astype(np.int32) - 1) & np.int32(_NEG_INF_BITS)).view(np.float32)
        if logits_row.dtype == torch.float32:
            row = logits_row.detach().numpy()
            np.add(row, bias, out=row)
        else:
            logits_row.add_(torch.from_numpy(bias))

    def advance(self, token_id: int) -> None:
        """Consume the sampled token; ValueError (state unchanged) if it was not allowed."""
        if not 0 <= token_id < self._vocab_size or not self._mask_bits()[token_id]:
            raise ValueError(f"token {token_id} is not allowed by the response_format grammar")
        self._inner.consume_token(token_id)
        self._raise_if_failed()
        self._bits = None

    @property
    def done(self) -> bool:
        """The value is complete and nothing but EOS may follow."""
        return self._inner.is_stopped() and not self._inner.is_error()

    def _mask_bits(self) -> np.ndarray:
        import numpy as np

        if self._bits is None:
            self._inner.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            self._raise_if_failed()
            # Bit i of word w is token 32*w+i: little-endian bytes, little bit order.
            self._bits = np.unpackbits(
                self._bitmask.view(np.uint8), count=self._vocab_size, bitorder="little"
            )
        return self._bits

    def _raise_if_failed(self) -> None:
        # The token was in the mask, so this is a parser limit the schema ran into (or a
        # library bug): the request it belongs to ends, the others go on.
        if self._inner.is_error():
            raise GrammarLimitError(f"grammar matcher failed: {_short(self._inner.get_error())}")


class ThinkingGate:
    """A reasoning request's matcher behind its thinking (ThinkFirst): no mask while the model
    thinks; the closing tag's token ends the thinking and the matcher starts at the next one.

    The tags never reach the matcher, which matters: llguidance reads every added token as a
    special one (Qwen3's `<think>`/`</think>` are added but not special), so no JSON or regex
    grammar ever allows them; a grammar from the first token left such a model no way to
    think. Not thread-safe: the engine loop owns it, as it owns the matcher."""

    def __init__(self, matcher: GrammarMatcher, spec: ThinkFirst) -> None:
        self.matcher = matcher
        self.spec = spec
        self.thinking = spec.open_id is None  # the prompt opened it: the output starts inside
        self._first = True  # no token sampled yet

    def apply(self, logits_row: torch.Tensor) -> None:
        """The grammar's mask once the thinking is over; on the first token of an output that
        may open it, the opening tag stays allowed beside the grammar's tokens."""
        if self.thinking:
            return
        open_id = self.spec.open_id
        if not self._first or open_id is None:
            self.matcher.apply(logits_row)
            return
        keep = logits_row[open_id].clone()
        self.matcher.apply(logits_row)
        logits_row[open_id] = keep

    def advance(self, token_id: int) -> None:
        """The sampled token: it moves the thinking along, or the matcher once it is over."""
        first, self._first = self._first, False
        if self.thinking:
            self.thinking = token_id != self.spec.end_id
        elif first and token_id == self.spec.open_id:
            self.thinking = True
        else:
            self.matcher.advance(token_id)

    @property
    def done(self) -> bool:
        return not self.thinking and self.matcher.done


class GrammarLimitError(RuntimeError):
    """llguidance stopped a matcher mid-decode (lexer fuel, states): the schema's fault."""


class GrammarUnavailable:
    """Stands in for GrammarCompiler on a model whose tokenizer llguidance cannot read: the
    model serves plain generation, and response_format on it is a 400 that says why."""

    def __init__(self, reason: str) -> None:
        self.reason = _short(reason)

    def prepare(self, spec: GrammarSpec) -> str | None:
        self.validate(spec)
        raise AssertionError("unreachable")  # validate always raises

    def validate(self, spec: GrammarSpec, text: str | None = None) -> None:
        raise UnsupportedSchemaError(
            "response_format is not available for this model: the grammar library cannot "
            f"read its tokenizer ({self.reason})"
        )

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        self.validate(spec)
        raise AssertionError("unreachable")  # validate always raises

    def refuse(self, spec: GrammarSpec, message: str) -> None:
        """Nothing is compiled here, so there is nothing to remember."""

    def compiled(self, spec: GrammarSpec) -> bool:
        """Nothing to compile: `matcher` refuses at once."""
        return True


# What an error calls each kind's source (the API puts the request field beside it).
_WHAT = {LARK: "tool grammar", REGEX: "regex", CHOICE: "choice", GRAMMAR: "grammar"}


def _what(spec: GrammarSpec) -> str:
    return _WHAT.get(spec.kind, "response_format schema")


def _grammar_text(spec: GrammarSpec) -> str:
    """_grammar, every refusal an UnsupportedSchemaError (llguidance's own are ValueErrors)."""
    try:
        return _grammar(spec)
    except UnsupportedSchemaError:
        raise
    except ValueError as exc:
        raise UnsupportedSchemaError(f"{_what(spec)} is invalid: {_short(exc)}") from exc


def _grammar(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a spec (a Lark grammar's schemas are checked by the
    caller, one tool at a time, so that the error names the tool)."""
    import llguidance

    if spec.kind == LARK:
        return llguidance.LLMatcher.grammar_from_lark(spec.lark or "")
    if spec.kind == REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.text or "")
    if spec.kind in (CHOICE, GRAMMAR):
        lark = _choice_lark(spec.text) if spec.kind == CHOICE else _lark(spec.text)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    text = _ANY_OBJECT if spec.kind == JSON_OBJECT else _checked(spec.schema_json)
    return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)


def _choice_lark(options_json: str | None) -> str:
    """One alternative per option, each a JSON-quoted literal (Lark reads JSON's escapes), so
    an option is matched exactly whatever characters it holds."""
    options = json.loads(options_json or "[]")
    return "start: " + " | ".join(json.dumps(o) for o in options)


def _lark(grammar: str | None) -> str:
    """A caller's grammar as Lark: GBNF/EBNF (`root ::= ...`, as vLLM's xgrammar backend reads
    it) is converted by llguidance's own converter; Lark passes through."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar or "")
    except Exception as exc:  # noqa: BLE001 - its parse errors are plain Exceptions
        raise ValueError(f"cannot read it as Lark or GBNF: {exc}") from exc


def _checked(schema_json: str | None) -> str:
    """The schema text, once every keyword in it is one llguidance enforces."""
    try:
        schema = json.loads(schema_json or "")
    except (ValueError, RecursionError) as exc:
        raise UnsupportedSchemaError(f"response_format schema is not JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise UnsupportedSchemaError("response_format schema must be a JSON object")
    stack: list[tuple[Any, str]] = [(schema, "#")]
    while stack:  # iterative: a deeply nested schema must not overflow Python's stack
        node, path = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise UnsupportedSchemaError(f"response_format schema at {path} is not a schema")
        _check_keywords(node, path)
        stack.extend(_subschemas(node, path))
    return schema_json or ""


def _check_keywords(node: dict[str, Any], path: str) -> None:
    for key in node:
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            raise UnsupportedSchemaError(
                f"response_format schema keyword '{key}' at {path} is not supported: "
                f"genserve cannot enforce it{_HINTS.get(key, '')}"
            )
    fmt = node.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in _FORMATS):
        raise UnsupportedSchemaError(
            f"response_format schema 'format': {json.dumps(fmt)} at {path} is not supported; "
            f"supported formats: {', '.join(sorted(_FORMATS))}"
        )


def _subschemas(node: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            yield from ((sub, f"{path}/{key}/{name}") for name, sub in value.items())
    for key in _SCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            yield from ((sub, f"{path}/{key}/{i}") for i, sub in enumerate(value))
    items = node.get("items")
    if isinstance(items, list):  # draft-7 tuple form, which llguidance also enforces
        yield from ((sub, f"{path}/items/{i}") for i, sub in enumerate(items))
    elif items is not None:
        yield items, f"{path}/items"
    if "additionalProperties" in node:
        yield node["additionalProperties"], f"{path}/additionalProperties"


def _short(error: object) -> str:
    """One line for an error response: llguidance spreads a regex error over several lines."""
    text = " ".join(str(error).replace("<non-verbose/>", "").split()) or "unknown error"
    for theirs, ours in _REWORDED.items():
        text = text.replace(theirs, ours)
    return text[:_MAX_ERROR_CHARS]
