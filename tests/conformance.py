"""Validate our responses against OpenAI's own OpenAPI document (../shared/reference)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.json"


def _denull(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` -> JSON Schema's null type, recursively."""
    if isinstance(node, list):
        return [_denull(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _denull(v) for k, v in node.items() if k != "nullable"}
    # OpenAPI 3.0's boolean exclusiveMinimum/Maximum; JSON Schema would read `true` as 1.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
            out[exclusive] = out.pop(bound)
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def spec() -> dict:
    return _denull(json.loads(SPEC.read_text()))


@functools.cache
def validator(name: str) -> Draft202012Validator:
    doc = spec()
    if name not in doc["components"]["schemas"]:
        raise KeyError(f"{name} is not a schema in {SPEC.name}")
    # The whole document rides along so that every #/components/... reference resolves.
    return Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"})


def assert_valid(instance: Any, name: str) -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        detail = "\n".join(f"- {list(e.path)}: {e.message}" for e in errors[:5])
        raise AssertionError(f"response does not validate against {name}:\n{detail}")


@functools.cache
def completion_chunk_validator() -> Draft202012Validator:
    """CreateCompletionResponse, but with finish_reason nullable.

    OpenAI documents one shape for completion responses and stream chunks, and its schema
    requires a string finish_reason; its live API (and every client) sends null on every chunk
    but the last. This is the one place where we follow the API rather than the document.
    """
    doc = json.loads(json.dumps(spec()))
    item = doc["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]
    reason = item["items"]["properties"]["finish_reason"]
    reason["type"] = ["string", "null"]
    reason["enum"] = [*reason["enum"], None]
    return Draft202012Validator({**doc, "$ref": "#/components/schemas/CreateCompletionResponse"})


def assert_valid_completion_chunk(instance: Any) -> None:
    errors = list(completion_chunk_validator().iter_errors(instance))
    if errors:
        raise AssertionError(f"completion chunk invalid: {errors[0].message} at {errors[0].path}")
