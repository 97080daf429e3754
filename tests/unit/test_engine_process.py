"""The engine process's plumbing without a model: the grammar gate in front of its engine, and
its records crossing the pipe."""

from __future__ import annotations

import pickle
import threading

from genserve.engine.process import Published
from genserve.engine.types import (
    EngineStats,
    FinishReason,
    GrammarSpec,
    Request,
    SamplingParams,
    TokenDelta,
)
from genserve.runtime.engine_main import GrammarGate
from tests.server import wait_until

SPEC = GrammarSpec.json_schema({"type": "object"})


class FakeCore:
    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.aborted: list[str] = []

    def submit(self, request: Request) -> None:
        self.submitted.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class SlowGrammars:
    """A compile that waits until the test lets it end."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.compiling = threading.Event()
        self.cached: set[GrammarSpec] = set()

    def compiled(self, spec: GrammarSpec) -> bool:
        return spec in self.cached

    def validate(self, spec: GrammarSpec) -> None:
        self.compiling.set()
        assert self.release.wait(timeout=30)
        self.cached.add(spec)


def request(rid: str, grammar: GrammarSpec | None) -> Request:
    return Request(rid, [1, 2], SamplingParams(max_tokens=4, grammar=grammar))


def test_requests_without_a_new_grammar_go_straight_to_the_engine() -> None:
    core, grammars = FakeCore(), SlowGrammars()
    grammars.cached.add(SPEC)
    gate = GrammarGate(core, grammars)
    gate.submit(request("plain", None))
    gate.submit(request("cached", SPEC))
    gate.abort("plain")
    gate.shutdown()
    assert core.submitted == ["plain", "cached"] and core.aborted == ["plain"]


def test_a_request_waits_for_its_compile_off_the_engine_and_an_abort_meanwhile_drops_it() -> None:
    core, grammars = FakeCore(), SlowGrammars()
    gate = GrammarGate(core, grammars)
    try:
        gate.submit(request("kept", SPEC))
        gate.submit(request("dropped", SPEC))
        assert grammars.compiling.wait(timeout=30)
        assert core.submitted == []  # the engine never waits on a compile
        gate.abort("dropped")
        grammars.release.set()
        wait_until(lambda: core.submitted == ["kept"], timeout=30)
    finally:
        gate.shutdown()
    assert "dropped" not in core.submitted and core.aborted == []


def test_a_step_crosses_the_pipe_as_it_left() -> None:
    delta = TokenDelta("r", (5, 6), "hi", FinishReason.LENGTH, 3, 2)
    message = Published((delta,), EngineStats(1, 0, 2, 8, 7), 123.5)
    assert pickle.loads(pickle.dumps(message)) == message
