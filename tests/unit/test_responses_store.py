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


def test_a_background_response_left_running_fails_past_every_event_a_client_saw(
    tmp_path: Path,
) -> None:
    """Its events reach the store in batches of EVENTS_FLUSH_EVERY, so a client may have read
    up to that many past the last one stored: the restart's response.failed comes after them
    all, and a cursor anywhere in between still gets it. Deleting it takes its events too."""
    import json

    from genserve.storage.responses import EVENTS_FLUSH_EVERY, StoredEvent

    store = ResponseStore(open_database(tmp_path))
    body = {"id": "resp_bg", "status": "in_progress", "background": True, "error": None}
    events = [StoredEvent(i, "response.created", json.dumps({"n": i})) for i in range(3)]
    store.put(StoredResponse("resp_bg", "p1", 1, body, [], []), events)
    done = {"id": "resp_done", "status": "completed", "background": True}
    store.put(StoredResponse("resp_done", "p1", 1, done, [], []))

    assert store.fail_unfinished("the server stopped") == ["resp_bg"]
    failed = store.get("resp_bg", "p1")
    assert failed.status == "failed" and failed.background
    assert failed.body["error"] == {"code": "server_error", "message": "the server stopped"}
    last_seen = 2 + EVENTS_FLUSH_EVERY - 1  # the most a client can have read
    (end,) = store.events_after("resp_bg", last_seen)
    assert end.type == "response.failed" and end.seq == last_seen + 1
    assert json.loads(end.data)["response"]["status"] == "failed"
    assert [e.seq for e in store.events_after("resp_bg", 0)] == [1, 2, end.seq]
    assert store.get("resp_done", "p1").status == "completed"  # ended: untouched
    assert store.fail_unfinished("again") == []  # once

    assert store.delete("resp_bg", "p1") and store.events_after("resp_bg", -1) == []
