"""OpenAI's list objects, as every paged route answers them: `{"object": "list", "data",
"first_id", "last_id", "has_more"}`, and the `after` cursor over a list held whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from genserve.api.errors import bad_request


def listing(data: Sequence[dict[str, Any]], has_more: bool, empty: str | None = "") -> dict:
    """A page; `empty` stands for first_id/last_id when it has no item (where OpenAI's schema
    makes them required strings, ""; elsewhere null, as those routes always answered)."""
    return {
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else empty,
        "last_id": data[-1]["id"] if data else empty,
        "has_more": has_more,
    }


def after_id(items: Sequence[dict[str, Any]], after: str | None, what: str) -> Sequence[dict]:
    """The items after the one whose id is `after`; a 400 naming `after` when none has it."""
    if after is None:
        return items
    ids = [item["id"] for item in items]
    if after not in ids:
        raise bad_request(f"no {what} `{after}` here", "after")
    return items[ids.index(after) + 1 :]
