"""Responses' input items -> chat messages, and the responses table (per project, durable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.api.errors import APIError
from genserve.api.responses_wire import input_items, messages
from genserve.runtime.tools import ToolCall
from genserve.storage.db import open_database
from genserve.storage.responses import ResponseStore, StoredResponse


def test_items_become_messages_with_calls_joined_to_their_turn() -> None:
    items = input_items(
        [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "message", "role": "assistant", "content": "checking"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "t", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ]
    )
    assert all(item["id"] for item in items)
    got = messages("be brief", items)
    assert [m.role for m in got] == ["system", "user", "assistant", "tool"]
    assert got[2].text == "checking"
    assert got[2].tool_calls == (ToolCall("c1", "w", "{}"), ToolCall("c2", "t", '{"a":1}'))
    assert got[3].tool_call_id == "c1" and got[3].text == "sunny"


@pytest.mark.parametrize(
    "bad",
    [[], [{"role": "tool", "content": "x"}], [{"type": "function_call", "name": "f"}],
     [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]],
)  # fmt: skip
def test_bad_items_are_400_naming_input(bad: list) -> None:
    with pytest.raises(APIError) as e:
        input_items(bad)
    assert e.value.status == 400 and e.value.param == "input"


def test_store_is_per_project_and_survives_reopening(tmp_path: Path) -> None:
    record = StoredResponse("resp_1", "p1", 1, {"id": "resp_1"}, [{"id": "msg_1"}], [])
    ResponseStore(open_database(tmp_path)).put(record)
    store = ResponseStore(open_database(tmp_path))
    assert store.get("resp_1", "p1") == record
    assert store.get("resp_1", "p2") is None
    assert not store.delete("resp_1", "p2")
    assert store.delete("resp_1", "p1") and store.get("resp_1", "p1") is None
