"""A request body -> the one sampling record (genserve.engine.types.SamplingParams), once.

Pydantic has checked each bound by now (400 naming the field); this applies a model's serving
defaults to what the body left out, then copies every field the wire schema and the record
share, converting the few whose wire shape differs. A field added to both needs no code here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from genserve.api.errors import bad_request
from genserve.api.schemas import ResponseFormat, SamplingFields
from genserve.engine.types import (
    JSON_OBJECT,
    GrammarSpec,
    SamplingParams,
    UnsupportedSchemaError,
)


def parse_logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """Sorted (token, bias) pairs, one per token: keys naming the same id ("1", "01") add up,
    as they did when the sampler added them one by one. The vocabulary's bound is the
    runtime's to check (it knows the model)."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            msg = f"logit_bias keys must be token ids, got {key!r}"
            raise bad_request(msg, "logit_bias") from None
        out[token] = out.get(token, 0.0) + float(value)
    return tuple(sorted(out.items()))


def _stop(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


# Wire shape -> record shape, for the fields where they differ.
CONVERT: dict[str, Callable[[Any], Any]] = {
    "stop": _stop,
    "stop_token_ids": tuple,
    "allowed_token_ids": tuple,
    "bad_words": tuple,
    "top_k": lambda k: max(k, 0),  # vLLM's -1 and 0 both mean "off"
    "logit_bias": parse_logit_bias,
}
# Fields each route sets itself: their wire meaning differs between chat and completions.
PER_ROUTE = ("max_tokens", "logprobs", "prompt_logprobs", "grammar")
# Fields no body sets: the runtime settles them from the model (bad_words, tokenized; where
# a reasoning model's grammar starts, from its template and prompt).
SETTLED = ("bad_words_token_ids", "think_first")
SHARED = tuple(
    f.name
    for f in fields(SamplingParams)
    if f.name in SamplingFields.model_fields and f.name not in PER_ROUTE
)


def check_prompt_logprobs(k: int | None, stream: bool | None) -> None:
    """vLLM's check: a stream has no place for the prompt's logprobs (chat and completions)."""
    if k is not None and stream:
        msg = "`prompt_logprobs` are not available when `stream` is true"
        raise bad_request(msg, "prompt_logprobs")


def apply_defaults(body: SamplingFields, defaults: dict[str, Any]) -> None:
    """A model's serving defaults fill the sampling fields the request left out."""
    for name, value in defaults.items():
        if name not in body.model_fields_set and name in type(body).model_fields:
            setattr(body, name, value)


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """The record; a field the body leaves null keeps the record's default. `grammar`: the
    constraint the route settled (api/structured.py), else the body's response_format's."""
    given = {}
    for name in SHARED:
        value = getattr(body, name)
        if value is not None:
            given[name] = CONVERT.get(name, _same)(value)
    return SamplingParams(
        **given,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar if grammar is not None else grammar_spec(body.response_format),
    )


def _same(value: Any) -> Any:  # noqa: ANN401
    return value


def grammar_spec(rf: ResponseFormat | None) -> GrammarSpec | None:
    """response_format -> the grammar the engine enforces (None: free text); 400 for what
    cannot be. Whether the model's grammar library compiles it is the runtime's check."""
    if rf is None or rf.type == "text":
        return None
    try:
        if rf.type == JSON_OBJECT:
            return GrammarSpec.json_object()
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise UnsupportedSchemaError("response_format.json_schema.schema is required")
        return GrammarSpec.json_schema(rf.json_schema.schema_)
    except UnsupportedSchemaError as e:
        raise bad_request(str(e), "response_format") from e
