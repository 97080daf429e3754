"""Typed records that cross the engine's queue and thread boundaries."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # the client went away; never sent to a client


JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
LARK = "lark"  # a Lark grammar (llguidance's dialect): tool calls
# A caller's own constraint (vLLM's structured_outputs / guided_* fields), its text in `text`:
REGEX = "regex"  # a regular expression (Rust's regex syntax) the whole output matches
CHOICE = "choice"  # exactly one of a list of strings, given as the list's JSON text
GRAMMAR = "grammar"  # a context-free grammar: Lark (llguidance's dialect) or GBNF/EBNF
TEXT_KINDS = (REGEX, CHOICE, GRAMMAR)
KINDS = (JSON_OBJECT, JSON_SCHEMA, LARK, *TEXT_KINDS)
# How every JSON grammar is generated (response_format and tool calls alike): compact JSON
# only, since with free whitespace a random or weak model can emit blanks forever.
COMPACT_JSON = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
    "coerce_one_of": False,
}


class UnsupportedSchemaError(ValueError):
    """A response_format the server cannot enforce; the message names what and where."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request's output must match; hashable, so compiled grammars are cached by it."""

    kind: str  # one of KINDS
    schema_json: str | None = None  # JSON text of the schema, for kind "json_schema"
    lark: str | None = None  # the grammar's text, for kind "lark"
    text: str | None = None  # the caller's regex, choices (JSON) or grammar: TEXT_KINDS

    def __post_init__(self) -> None:
        if (self.kind == LARK) != isinstance(self.lark, str):
            raise ValueError("a lark grammar needs its text, and only it")
        if (self.kind in TEXT_KINDS) != isinstance(self.text, str):
            raise ValueError(f"`text` is for the kinds {TEXT_KINDS}, and each needs it")
        if self.kind == JSON_OBJECT and self.schema_json is not None:
            raise ValueError("a json_object grammar takes no schema")
        if self.kind == JSON_SCHEMA and not isinstance(self.schema_json, str):
            raise ValueError("a json_schema grammar needs the schema's JSON text")
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}")

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls(JSON_OBJECT)

    @classmethod
    def lark_grammar(cls, text: str) -> GrammarSpec:
        return cls(LARK, lark=text)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls(REGEX, text=pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> GrammarSpec:
        """Kept as JSON text: the spec stays hashable, and the compiler quotes each option."""
        return cls(CHOICE, text=json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> GrammarSpec:
        return cls(GRAMMAR, text=text)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any]) -> GrammarSpec:
        """Compact text, keys NOT sorted: llguidance emits properties in the order the schema
        lists them (as OpenAI does), so sorting would reorder every generated object."""
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise UnsupportedSchemaError(f"response_format schema is not JSON: {exc}") from exc
        return cls(JSON_SCHEMA, text)


@dataclass(frozen=True, slots=True)
class ThinkFirst:
    """A reasoning model's grammar waits for its thinking (vLLM's behaviour with a reasoning
    parser): no mask until the closing tag's token `end_id` is sampled, and the grammar's
    matcher starts at the token after it, so the tags never reach it. `open_id` None: the
    prompt opened the thinking (DeepSeek-R1's template). Else the model may open it: its first
    token may be `open_id` (the opening tag's) besides what the grammar allows (Qwen3's)."""

    end_id: int
    open_id: int | None = None

    def __post_init__(self) -> None:
        if self.end_id < 0 or (self.open_id is not None and self.open_id < 0):
            raise ValueError("token ids are not negative")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding controls, with OpenAI's and vLLM's meanings; temperature 0 is greedy.

    The one sampling record from the edge to the engine: the API converts a request body to it
    once (genserve.api.sampling), where each bound is checked with the field it names, and the
    runtime settles max_tokens before the engine sees it. The defaults here are the defaults.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    max_tokens: int | None = None  # None: the rest of the context (the runtime settles it)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), one per token, sorted
    # vLLM's: only these ids may be drawn (None: any); bad_words' token sequences may not be
    # generated. The runtime tokenizes bad_words into bad_words_token_ids (settle()); the
    # engine reads only the ids.
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (echo + logprobs)
    grammar: GrammarSpec | None = None
    think_first: ThinkFirst | None = None  # the grammar applies after the thinking (reasoning)
    # vLLM's detokenizing controls: a matched stop string (or a stop token's text) is kept at
    # the end of the output; special tokens' text (<|im_end|>, ...) is dropped from it.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def reproducible(self) -> bool:
        """A seeded request's numbers must not depend on its batch (DESIGN rule 4): it takes
        the batch-invariant path even when the server does not run --deterministic."""
        return self.seed is not None


# Request.priority: lower runs first. Batch API work only fills what interactive calls leave.
INTERACTIVE = 0
BACKGROUND = 1


@dataclass(slots=True)
class Request:
    """One sequence to generate. A call's n choices are n requests, admitted and streamed as
    one group (AsyncEngine.open)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # LoRA adapter id; None: the base model
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = INTERACTIVE  # BACKGROUND: a Batch API request (see engine.scheduler)
    tenant: str = ""  # the caller's project: admission is shared fairly between tenants
    # How often the engine sends this request's tokens on (engine.core.EngineCore._outbox):
    # every `publish_every` tokens; 0: when it finishes (an answer sent whole). The first token
    # and the last always go at once, so time to first token is the same either way.
    publish_every: int = 1

    @property
    def background(self) -> bool:
        return self.priority > INTERACTIVE


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """log p of one token, and the k most likely alternatives at its position (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # the token's rank in its distribution (1: the most likely), when known


class FailureKind(enum.StrEnum):
    """Whose fault a failed request is; the API picks the status from it."""

    INTERNAL = "internal"  # a bug or a resource limit: 500
    INVALID = "invalid"  # the caller's own input (a schema past the grammar's limits): 400
    UNAVAILABLE = "unavailable"  # the model was unloaded or its engine stopped: 503


@dataclass(frozen=True, slots=True)
class RequestFailure:
    """Why the engine ended one request early; the other requests of its step go on."""

    message: str
    kind: FailureKind = FailureKind.INTERNAL
    param: str | None = None  # the request field at fault, for an INVALID failure

    def __post_init__(self) -> None:
        if not self.message:
            raise ValueError("a request failure needs a message")


@dataclass(frozen=True, slots=True)
class SampledToken:
    """What the model worker returns per sampling row: a token, or why this row failed."""

    token_id: int
    logprob: TokenLogprob | None = None
    grammar_done: bool = False  # the grammar accepts nothing more: the output is complete
    error: RequestFailure | None = None  # this row alone failed (token_id is then meaningless)


@dataclass(frozen=True, slots=True)
class RequestTimes:
    """The phases of a request that ended (stop or length), in seconds, as vLLM splits them:
    measured by the engine on its own clock, since a monotonic clock means nothing in another
    process. Sent once, with the request's last delta: no cost per token."""

    queued_s: float  # the engine received it -> first scheduled
    prefill_s: float  # first scheduled -> first token (a preemption meanwhile included)
    decode_s: float  # first token -> last token

    @property
    def inference_s(self) -> float:
        """First scheduled -> last token: the time it spent running."""
        return self.prefill_s + self.decode_s


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """What one engine step produced for one request: new tokens and the text they complete."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when asked for
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # once, first delta, when asked for
    error: RequestFailure | None = None  # with finish_reason ABORT: why the engine ended it
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    times: RequestTimes | None = None  # on the last delta of a request that ended normally

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, later: TokenDelta) -> TokenDelta:
        """This delta and the next of the same request as one: tokens, text and logprobs in
        order, the counts and the outcome of the later one."""
        return TokenDelta(
            self.request_id, self.token_ids + later.token_ids, self.text + later.text,
            later.finish_reason, later.prompt_tokens, later.completion_tokens,
            self.logprobs + later.logprobs, self.prompt_logprobs or later.prompt_logprobs,
            later.error, later.cached_tokens, later.times,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /health, metrics and tests."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int  # held by running sequences
    kv_blocks_total: int
    steps: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, ever
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preempted: int = 0  # sequences preempted (blocks freed, recomputed later), ever
    compiled_decode: str = "off"  # --compile-decode: "compiling", "ready" or "failed"

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / max(self.kv_blocks_total, 1)


@dataclass(frozen=True, slots=True)
class ChunkInput:
    """Tokens of one sequence that run in this step, at positions start..start+len-1."""

    request_id: str
    slot: int
    token_ids: tuple[int, ...]
    start: int
    sample: bool  # a new token is sampled after the last of these
    params: SamplingParams
    num_generated: int  # tokens generated so far (min_tokens suppresses EOS until reached)
    adapter: str | None = None  # LoRA adapter applied to this chunk's rows
    # The sequence's KV blocks, position p in block blocks[p // block_size]; empty: the
    # runner's static slot `slot` (runners without a paged cache, and tests of one step).
    blocks: tuple[int, ...] = ()

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits the model returns for this chunk: every row when prompt logprobs
        are wanted, else the last row when a token is sampled after it, else none."""
        if self.params.prompt_logprobs is not None:
            return len(self.token_ids)
        return 1 if self.sample else 0


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy the first `rows` positions of KV blocks from `src` on into blocks from `dst` on
    before the step runs: a cached partial block reused by a sequence that goes on writing past
    it (the source may be read by others, so it is never written), or a run of `blocks` cached
    full blocks brought into a new sequence's own lane (engine/kv_blocks.py)."""

    src: int
    dst: int
    rows: int
    blocks: int = 1  # consecutive blocks from src (and from dst): rows spans them all

    def sources(self) -> range:
        return range(self.src, self.src + self.blocks)


@dataclass(frozen=True, slots=True)
class StepInput:
    """Everything the model worker needs for one engine step."""

    chunks: tuple[ChunkInput, ...]
    copies: tuple[BlockCopy, ...] = ()  # applied before any chunk runs
