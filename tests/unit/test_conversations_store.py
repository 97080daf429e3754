"""The conversations tables: items in the order they came, paged both ways, per project, gone
with their conversation; an id collision at append time keeps the turn under a new id."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.api.errors import APIError
from genserve.api.responses_wire import input_items
from genserve.storage.conversations import ConversationStore, StoredConversation
from genserve.storage.db import open_database


def item(item_id: str) -> dict:
    return {"id": item_id, "type": "message", "role": "user", "content": [], "status": "completed"}


def store_with(tmp_path: Path, n: int) -> ConversationStore:
    store = ConversationStore(open_database(tmp_path))
    store.create(StoredConversation("conv_1", "p1", 1, {"k": "v"}), [item("m0")])
    assert store.append("conv_1", "p1", [item(f"m{i}") for i in range(1, n)])
    return store


def ids(items: list[dict]) -> list[str]:
    return [i["id"] for i in items]


def test_items_keep_their_order_and_page_both_ways(tmp_path: Path) -> None:
    store = store_with(tmp_path, 5)
    assert ids(store.items("conv_1")) == ["m0", "m1", "m2", "m3", "m4"]
    first = store.page("conv_1", None, 2, descending=True)
    assert ids(first.items) == ["m4", "m3"] and first.has_more
    rest = store.page("conv_1", "m3", 10, descending=True)
    assert ids(rest.items) == ["m2", "m1", "m0"] and not rest.has_more
    assert ids(store.page("conv_1", "m2", 2, descending=False).items) == ["m3", "m4"]
    assert store.page("conv_1", "nope", 2, descending=False) is None
    assert store.taken("conv_1", ["m1", "x", "m4"]) == ["m1", "m4"]


def test_per_project_durable_and_deleted_with_its_items(tmp_path: Path) -> None:
    store_with(tmp_path, 3)
    store = ConversationStore(open_database(tmp_path))  # reopened
    assert store.get("conv_1", "p1").metadata == {"k": "v"}
    assert store.get("conv_1", "p2") is None
    assert not store.append("conv_1", "p2", [item("x")])
    assert not store.delete("conv_1", "p2")
    assert store.set_metadata("conv_1", "p1", {}) and store.get("conv_1", "p1").metadata == {}
    assert store.delete_item("conv_1", "m1") and store.item("conv_1", "m1") is None
    assert store.delete("conv_1", "p1")
    assert store.items("conv_1") == [] and store.get("conv_1", "p1") is None
    assert not store.append("conv_1", "p1", [item("late")])  # a response ending after it


def test_a_taken_id_at_append_time_gets_a_new_one(tmp_path: Path) -> None:
    store = store_with(tmp_path, 2)
    assert store.append("conv_1", "p1", [item("m1"), item("fc_x")])
    got = ids(store.items("conv_1"))
    assert got[:2] == ["m0", "m1"] and got[3] == "fc_x"
    assert got[2] != "m1" and len(set(got)) == 4


def test_items_are_checked_as_a_responses_input_naming_items() -> None:
    with pytest.raises(APIError) as e:
        input_items([{"role": "tool", "content": "x"}], "items")
    assert e.value.status == 400 and e.value.param == "items"
    assert "items[0].role" in e.value.message
