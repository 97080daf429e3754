"""vLLM's constraints on the output -> the one grammar the engine enforces (GrammarSpec).

Users coming from vLLM send `structured_outputs: {json | regex | choice | grammar |
json_object}` or the older top-level `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` through the client's `extra_body`. Ignoring them gave free text to a caller
who asked for constrained output, so each is enforced by the same grammar machinery as
`response_format`, and what cannot be honoured is a 400 naming the field: two constraints at
once, an option genserve has no way to apply. Whether the model's grammar library compiles
the regex, grammar or schema is the runtime's check (a 400 too, naming the same field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from genserve.api.errors import bad_request
from genserve.api.sampling import grammar_spec
from genserve.api.schemas import StructuredOutputFields, StructuredOutputs
from genserve.engine.types import GrammarSpec, UnsupportedSchemaError

RESPONSE_FORMAT = "response_format"


@dataclass(frozen=True, slots=True)
class Constraint:
    """The grammar a request's output must match, and the body field it came from (its
    errors name that field)."""

    spec: GrammarSpec
    param: str


GUIDED = {f"guided_{kind}": kind for kind in ("json", "regex", "choice", "grammar")}
# Options that ask for what genserve cannot do: refused when set, never ignored.
REFUSED = {
    "structured_outputs.whitespace_pattern": "output JSON is always compact (no whitespace)",
    "guided_whitespace_pattern": "output JSON is always compact (no whitespace)",
    "structured_outputs.structural_tag": "structural tags are not supported",
    "structured_outputs.disable_additional_properties": "it is not supported; set "
    '"additionalProperties": false in the schema itself',
}


@dataclass(frozen=True, slots=True)
class _Given:
    param: str  # the body field: "response_format", "structured_outputs.regex", "guided_json"
    kind: str  # "response_format", or a structured_outputs key
    value: Any


def output_constraint(body: StructuredOutputFields) -> Constraint | None:
    """The body's one constraint (response_format, structured_outputs or a guided_* field),
    or None for free text; a 400 naming the field for two at once or an unusable option."""
    _refuse_options(body)
    given = _given(body)
    if len(given) > 1:
        first, second = given[0].param, given[1].param
        msg = f"`{second}` cannot be combined with `{first}`: give one constraint on the output"
        raise bad_request(msg, second)
    spec = _spec(given[0]) if given else None
    return None if spec is None else Constraint(spec, given[0].param)


def _given(body: StructuredOutputFields) -> list[_Given]:
    """Each constraint the body sets, response_format first."""
    given = []
    rf = getattr(body, RESPONSE_FORMAT, None)
    if rf is not None and rf.type != "text":
        given.append(_Given(RESPONSE_FORMAT, RESPONSE_FORMAT, rf))
    for kind, value in _structured(body.structured_outputs).items():
        given.append(_Given(f"structured_outputs.{kind}", kind, value))
    for field, kind in GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            given.append(_Given(field, kind, value))
    return given


def _structured(so: StructuredOutputs | None) -> dict[str, Any]:
    """The constraints set in structured_outputs (json_object only when true)."""
    if so is None:
        return {}
    values = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
    values["json_object"] = True if so.json_object else None
    return {kind: v for kind, v in values.items() if v is not None}


def _spec(given: _Given) -> GrammarSpec | None:
    kind, value = given.kind, given.value
    if kind == RESPONSE_FORMAT:
        return grammar_spec(value)  # its own 400s name response_format
    if kind == "regex":
        return GrammarSpec.regex(value)
    if kind == "choice":
        return GrammarSpec.choice(value)
    if kind == "grammar":
        return GrammarSpec.grammar(value)
    if kind == "json_object":
        return GrammarSpec.json_object()
    try:
        return GrammarSpec.json_schema(schema_of(value, given.param))
    except UnsupportedSchemaError as e:
        msg = str(e).replace("response_format schema", f"{given.param} schema")
        raise bad_request(msg, given.param) from e


def _refuse_options(body: StructuredOutputFields) -> None:
    for param, why in REFUSED.items():
        owner, _, name = param.rpartition(".")
        holder = body.structured_outputs if owner else body
        if holder is not None and getattr(holder, name, None):
            raise bad_request(f"`{param}` cannot be honoured: {why}", param)


def schema_of(value: dict | str, param: str) -> dict:
    """A JSON schema given as an object or as its JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise bad_request(f"`{param}` is not a JSON schema: {e}", param) from e
    if not isinstance(value, dict):
        raise bad_request(f"`{param}` must be a JSON schema object", param)
    return value
