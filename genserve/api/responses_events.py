"""A Responses stream's typed events (OpenAI's `response.*` events): the state of one streamed
response and the events each generation step makes. A plain stream (api/responses.py) sends
them as they come; a background response (api/responses_background.py) keeps them too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from genserve.api.logprobs import TokenIds
from genserve.api.responses_wire import (
    Envelope,
    call_item,
    call_status,
    logprob_entries,
    message_item,
    new_id,
    reasoning_item,
)
from genserve.runtime.generation import ChoiceDelta
from genserve.runtime.tokens import TokenText
from genserve.runtime.tools import ToolCall


@dataclass(slots=True)
class StreamState:
    """Where a streamed response is: its output items so far and the open one."""

    env: Envelope
    name: TokenText | TokenIds | None = None  # names tokens in logprobs, when asked for
    seq: int = 0
    output: list[dict] = field(default_factory=list)
    text_id: str | None = None  # the message item being written
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # the open message's, so far
    unsent: list[dict] = field(default_factory=list)  # of those, not yet in a delta event
    calls: dict[int, tuple[str, ToolCall]] = field(default_factory=dict)  # index -> item, call
    completion_tokens: int = 0  # so far
    reasoning_tokens: int = 0  # of those, a reasoning model's thinking
    thought_id: str | None = None  # the reasoning item being written
    thought: list[str] = field(default_factory=list)
    cached_tokens: int = 0  # of the prompt, served by the prefix cache
    reason: str | None = None  # the finish reason, once there is one

    def event(self, kind: str, **fields: Any) -> dict:  # noqa: ANN401
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return {"event": kind, "data": json.dumps(data)}

    @property
    def status(self) -> str:
        """The status the response ends with, once it has come to its end."""
        return "incomplete" if self.reason == "length" else "completed"


def advance(st: StreamState, d: ChoiceDelta) -> list[dict]:
    """One generation step: what it adds to the counts, and its events."""
    st.completion_tokens, st.reason = d.delta.completion_tokens, d.finish_reason or st.reason
    st.cached_tokens = d.delta.cached_tokens or st.cached_tokens
    st.reasoning_tokens = d.reasoning_tokens
    return step(st, d)


def step(st: StreamState, d: ChoiceDelta) -> list[dict]:
    """The events one generation step makes."""
    out = think(st, d.reasoning)
    if d.text or d.calls:
        out += close_thought(st, "completed")
    if st.name is not None and not d.calls:  # a call's tokens are its arguments, not text
        st.unsent += logprob_entries(d.delta.logprobs, st.name)
    if d.text:
        out += open_text(st)
        st.text.append(d.text)
        st.logprobs += st.unsent
        out.append(
            st.event(
                "response.output_text.delta",
                item_id=st.text_id,
                output_index=len(st.output),
                content_index=0,
                delta=d.text,
                logprobs=st.unsent,
            )  # fmt: skip
        )
        st.unsent = []
    for c in d.calls:
        if c.id is not None:
            out += close_text(st, "completed")
            out += open_call(st, c.index, ToolCall(c.id, c.name or "", ""))
        if c.arguments:
            item_id, call = st.calls[c.index]
            grown = ToolCall(call.id, call.name, call.arguments + c.arguments)
            st.calls[c.index] = (item_id, grown)
            out.append(
                st.event(
                    "response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=len(st.output),
                    delta=c.arguments,
                )  # fmt: skip
            )
    return out


def think(st: StreamState, text: str) -> list[dict]:
    """A reasoning model's thinking: its item opened once, then a delta a piece."""
    if not text:
        return []
    out = []
    if st.thought_id is None:
        st.thought_id = new_id("rs")
        item = reasoning_item(st.thought_id, "", "in_progress")
        out.append(st.event("response.output_item.added", output_index=len(st.output), item=item))
    st.thought.append(text)
    out.append(
        st.event(
            "response.reasoning_text.delta", item_id=st.thought_id,
            output_index=len(st.output), content_index=0, delta=text,
        )
    )  # fmt: skip
    return out


def close_thought(st: StreamState, status: str) -> list[dict]:
    if st.thought_id is None or _closed(st, st.thought_id):
        return []
    text, index = "".join(st.thought), len(st.output)
    item = reasoning_item(st.thought_id, text, status)
    st.output.append(item)
    return [
        st.event(
            "response.reasoning_text.done", item_id=st.thought_id, output_index=index,
            content_index=0, text=text,
        ),
        st.event("response.output_item.done", output_index=index, item=item),
    ]  # fmt: skip


def open_text(st: StreamState) -> list[dict]:
    if st.text_id is not None:
        return []
    st.text_id = new_id("msg")
    index = len(st.output)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return [
        st.event(
            "response.output_item.added", output_index=index,
            item=message_item(st.text_id, "", "in_progress"),
        ),
        st.event(
            "response.content_part.added", item_id=st.text_id, output_index=index,
            content_index=0, part=part,
        ),
    ]  # fmt: skip


def close_text(st: StreamState, status: str) -> list[dict]:
    if st.text_id is None:
        return []
    text, item_id, index = "".join(st.text), st.text_id, len(st.output)
    logprobs, st.logprobs, st.unsent = st.logprobs + st.unsent, [], []
    item = message_item(item_id, text, status, logprobs)
    st.output.append(item)
    st.text_id, st.text = None, []
    return [
        st.event(
            "response.output_text.done", item_id=item_id, output_index=index,
            content_index=0, text=text, logprobs=logprobs,
        ),
        st.event(
            "response.content_part.done", item_id=item_id, output_index=index,
            content_index=0, part=item["content"][0],
        ),
        st.event("response.output_item.done", output_index=index, item=item),
    ]  # fmt: skip


def open_call(st: StreamState, index: int, call: ToolCall) -> list[dict]:
    out = close_call(st)
    item_id = new_id("fc")
    st.calls[index] = (item_id, call)
    item = call_item(item_id, call, "in_progress")
    return [*out, st.event("response.output_item.added", output_index=len(st.output), item=item)]


def close_call(st: StreamState) -> list[dict]:
    """Closes the call being written (only the last one can be open)."""
    open_ = [i for i, (item_id, _) in st.calls.items() if not _closed(st, item_id)]
    if not open_:
        return []
    item_id, call = st.calls[open_[-1]]
    index = len(st.output)
    item = call_item(item_id, call, call_status(call))
    st.output.append(item)
    return [
        st.event(
            "response.function_call_arguments.done", item_id=item_id, output_index=index,
            name=call.name, arguments=call.arguments,
        ),
        st.event("response.output_item.done", output_index=index, item=item),
    ]  # fmt: skip


def _closed(st: StreamState, item_id: str) -> bool:
    return any(item["id"] == item_id for item in st.output)


def close_all(st: StreamState, status: str) -> list[dict]:
    out = close_thought(st, status) + close_text(st, status) + close_call(st)
    if not any(item["type"] != "reasoning" for item in st.output):
        # An empty answer is still one (empty) message, as OpenAI sends it.
        out += open_text(st) + close_text(st, status)
    return out
