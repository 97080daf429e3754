"""The engine in a process of its own (genserve.engine.process), and the grammar checks in a
helper process (genserve.runtime.grammar_check): nothing the API process does holds the
engine's GIL, a dead engine process fails its requests instead of hanging them, and a stopped
server leaves no process behind."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from genserve.config import EngineConfig, ModelConfig, ServerConfig
from genserve.engine.process import EngineProcess
from genserve.engine.types import GrammarSpec, Request, SamplingParams, UnsupportedSchemaError
from genserve.runtime.build import build_served_model
from genserve.runtime.grammar_check import HELPER_NICENESS, HelperChecks, serialized_tokenizer
from tests.server import start_server, wait_until


def hold_the_gil() -> None:
    """One C call that never releases the GIL for about a second: the regex engine
    backtracking through 2**23 ways to split the a's (no Python code of any thread runs)."""
    assert re.fullmatch(r"(a+)+b", "a" * 23) is None


def spawned_children(pid: int) -> list[psutil.Process]:
    """A process's spawned children (engine, grammar helper), oldest first."""
    kids = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
    return sorted(kids, key=lambda p: p.create_time())


def test_the_engine_steps_while_the_api_process_holds_its_gil(tiny_model_dir: Path) -> None:
    """On a thread of this process no step could end while the GIL is held (its Python needs
    it); in its own process the engine goes on, and its deltas wait in the pipe."""
    cfg = replace(
        ServerConfig(),
        model=replace(ModelConfig(), ref=str(tiny_model_dir), embedding_model=None),
        engine=EngineConfig(max_batch_size=2, max_model_len=512),
    )
    served = build_served_model(cfg)
    core = served.engine.core
    assert isinstance(core, EngineProcess) and core.pid not in (None, os.getpid())
    sent_at: list[float] = []
    done = threading.Event()

    def on(deltas) -> None:  # noqa: ANN001
        assert core.last_published is not None
        sent_at.append(core.last_published.at)
        if any(d.finished for d in deltas):
            done.set()

    core.publish = on
    core.start()
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        core.submit(Request("r", [5, 6, 7], params))
        wait_until(lambda: sent_at, timeout=60)
        start = time.monotonic()
        hold_the_gil()
        end = time.monotonic()
        assert done.wait(timeout=60)
    finally:
        served.stop()
    during = [t for t in sent_at if start < t < end]
    assert during, (start, end, sent_at[:3], sent_at[-3:])


@pytest.fixture()
def own_server(tiny_model_dir: Path, tmp_path: Path):  # noqa: ANN201
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch-size", "4")
    yield srv
    srv.stop()


def test_a_killed_engine_process_fails_its_streams_and_health_says_so(own_server) -> None:
    health = httpx.get(own_server.url + "/health").json()
    engine = psutil.Process(health["models"]["tiny-llama"]["engine_pid"])
    assert engine.pid != own_server.proc.pid and engine.ppid() == own_server.proc.pid
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(base_url=own_server.url, timeout=60) as http:
        engine.suspend()  # the request is admitted, and its stream open, before any token
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            engine.kill()
            rest = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert rest and '"error"' in rest[-1], rest[-3:]
        assert any("engine process exited" in line for line in rest), rest[-3:]
        health = wait_until(lambda: (r := http.get("/health")).status_code == 503 and r)
        assert health.json()["status"] == "engine_failed"
        assert "exit code -9" in health.json()["error"]
        again = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
        assert again.status_code == 503
        assert "engine process exited" in again.json()["error"]["message"]


def test_sigterm_ends_the_engine_and_grammar_processes_with_the_server(own_server) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}  # fmt: skip # noqa: E501
    assert httpx.post(own_server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    children = spawned_children(own_server.proc.pid)
    assert len(children) == 2  # the engine, and the grammar helper the schema was checked in
    assert own_server.stop() == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_helper_checks_refuse_in_a_process_of_their_own_at_low_priority(tiny_model_dir) -> None:
    import asyncio

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    checks = HelperChecks(serialized_tokenizer(tok), len(tok), (tok.eos_token_id,))
    ok = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    unmatchable = GrammarSpec.json_schema({"type": "string", "pattern": "^(x{1000}){1000}$"})
    try:
        asyncio.run(checks.check(ok))
        with pytest.raises(UnsupportedSchemaError, match="grammar's limits"):
            asyncio.run(checks.check(unmatchable))
        *_, helper = spawned_children(os.getpid())  # the newest: this test's helper
        assert os.getpriority(os.PRIO_PROCESS, helper.pid) >= HELPER_NICENESS
        # Built from the serialized tokenizer: neither torch nor transformers loaded there.
        assert not [m.path for m in helper.memory_maps() if "libtorch" in m.path]
        checks.close()
        # Remembered on this side: asked again, the same refusal comes without the helper.
        with pytest.raises(UnsupportedSchemaError, match="grammar's limits"):
            asyncio.run(checks.check(unmatchable))
    finally:
        checks.close()


def test_a_sigkilled_server_leaves_no_engine_or_grammar_process(tiny_model_dir, tmp_path) -> None:
    """Nothing is asked to stop: the engine sees its pipe close, the helper its parent go."""
    server = start_server(tiny_model_dir, tmp_path, "--max-batch-size", "2")
    try:
        wait_until(
            lambda: (
                httpx.get(server.url + "/health").json()["models"]["tiny-llama"]["grammar"]
                == "ready"
            )
        )
        children = spawned_children(server.proc.pid)
        assert len(children) == 2, children
    finally:
        server.proc.kill()
        server.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_a_helper_closed_while_it_starts_is_ended_not_waited_for(tiny_model_dir) -> None:
    """Closed right after its start (a server stopped soon after /health said ok), the helper
    still loading its tokenizer gets SIGTERM: before, the server's exit waited for its load
    and then its exit (4.5 s of a 0.9 s stop on a 2-core EPYC)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    checks = HelperChecks(serialized_tokenizer(tok), len(tok), (tok.eos_token_id,))
    before = set(multiprocessing.active_children())
    checks.start()
    [process] = set(multiprocessing.active_children()) - before  # started by start()
    assert checks.state == "starting"
    checks.close()
    # The pool's own thread reaps it too; whichever waits first, the code lands on `process`.
    wait_until(lambda: process.exitcode is not None, timeout=30)
    assert process.exitcode == -signal.SIGTERM
    assert checks.state == "stopped"
