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


def test_streamed_text_then_calls_make_well_formed_events() -> None:
    """Text, then a call: the message item is closed before the call's item opens, each
    event validates, and the items' indexes follow the output list."""
    import json

    from genserve.api.responses import StreamState, close_all, step
    from genserve.api.responses_wire import Envelope, ResponsesRequest
    from genserve.runtime.generation import ChoiceDelta
    from genserve.runtime.tools import CallDelta
    from tests.conformance import assert_valid

    st = StreamState(Envelope("resp_1", 1, "m", ResponsesRequest(model="m", input="x")))
    deltas = [
        ChoiceDelta(0, "let me check", None, None),  # type: ignore[arg-type]
        ChoiceDelta(
            0, "", None, None, (CallDelta(0, "call_1", "w"), CallDelta(0, arguments='{"a"'))
        ),  # type: ignore[arg-type]
        ChoiceDelta(0, "", "tool_calls", None, (CallDelta(0, arguments=":1}"),)),  # type: ignore[arg-type]
    ]
    events = [e for d in deltas for e in step(st, d)] + close_all(st, "completed")
    data = [json.loads(e["data"]) for e in events]
    for event in data:
        assert_valid(event, "ResponseStreamEvent")
    kinds = [e["type"] for e in data]
    assert kinds.index("response.output_item.done") < kinds.index(
        "response.function_call_arguments.delta"
    )
    assert [item["type"] for item in st.output] == ["message", "function_call"]
    assert st.output[1]["arguments"] == '{"a":1}' and st.output[1]["status"] == "completed"
    args_events = [e for e in data if e["type"].startswith("response.function_call_arguments")]
    assert {e["output_index"] for e in args_events} == {1}
