"""Strings decoded from JSON that are not text, and how a field's place is named.

JSON can spell a lone surrogate (`"\\ud800"`): it decodes to a Python str that no tokenizer,
JSON encoder or database takes (each raised on it). The API refuses such a body whole
(genserve.api.middleware) and the Batch API such a line (genserve.runtime.batches)."""

from __future__ import annotations

from collections.abc import Sequence

FieldAt = tuple[str | int, ...]  # a place in a JSON value: keys and list indices


def is_text(value: str) -> bool:
    """Whether the string encodes to UTF-8 (no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate_at(value: object, at: FieldAt = ()) -> FieldAt | None:
    """Where a decoded JSON value first holds a lone surrogate (in a key or a string), or None.
    A key that holds one is named with it escaped, so the name can be sent back."""
    if isinstance(value, str):
        return None if is_text(value) else at
    if isinstance(value, dict):
        for key, item in value.items():
            if not is_text(key):
                return (*at, key.encode("utf-8", "backslashreplace").decode())
            if (found := lone_surrogate_at(item, (*at, key))) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := lone_surrogate_at(item, (*at, i))) is not None:
                return found
    return None


def field_name(at: Sequence[str | int]) -> str | None:
    """A field's place as OpenAI's `param` names it: ("messages", 0, "content") ->
    "messages.[0].content"; None for the whole value."""
    if not at:
        return None
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in at)
