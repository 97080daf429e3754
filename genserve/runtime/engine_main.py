"""What the engine process runs (genserve.engine.process): the engine built as the in-thread
server builds it, then the parent's messages relayed to it until it says stop or goes away.
And `spawn_engine`, which starts it: light (no torch), so a server starts its engine process
before it imports torch itself."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from genserve import logs
from genserve.config import ServerConfig
from genserve.engine.core import Abort, AdapterOp, EngineCore
from genserve.engine.process import (
    AdapterCall,
    AdapterDone,
    EngineLink,
    EngineProcess,
    Published,
    Ready,
    Stop,
)
from genserve.engine.types import Request
from genserve.runtime import heap
from genserve.runtime.limits import lower_priority

log = logging.getLogger(__name__)
GRAMMAR_WORKERS = 2


def spawn_engine(cfg: ServerConfig, build: Callable[[ServerConfig], Any]) -> EngineProcess:
    """The engine process for `cfg`, started now; `build` builds its engine there (a
    module-level function: it pickles by name). genserve.server calls this first thing, so the
    child's imports and weights load while the API process imports its own (a tiny model's
    server was healthy after ~15 s, ~4 of them the API process's imports before it started
    the child, on a 2-core EPYC)."""
    level = logging.getLogger().getEffectiveLevel()
    # Hashed: the engine never checks a key, and plaintext ones pickled down its pipe would
    # sit in its memory (its environment has none either: genserve.config.drop_secret_env).
    child = EngineProcess(engine_main, build, replace(cfg, security=cfg.security.hashed()), level)
    child.spawn()
    return child


def engine_main(
    link: EngineLink, build: Callable[[ServerConfig], Any], cfg: ServerConfig, log_level: int
) -> None:
    """`build`: genserve.runtime.build.build_engine, or what imports it (passed, so neither
    module imports the other's; it pickles by name)."""
    logs.configure(log_level)
    try:
        parts = build(cfg)
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it
        link.fail_start(e)
        return
    # Before the first step: a full collection then pauses no step (a cycle holding weights
    # the build dropped is freed first, not frozen).
    heap.settle()
    core = parts.core
    # On the engine thread, after each step: the stats go with the deltas they describe.
    core.publish = lambda deltas: link.send(
        Published(tuple(deltas), core.stats(), time.monotonic())
    )
    core.start()
    link.send(Ready(parts.info, core.stats()))
    gate = GrammarGate(core, parts.grammars)
    try:
        relay(link, core, gate)
    finally:
        gate.shutdown()
        core.stop()  # what is still in flight ends with an error, sent to the parent
        heap.before_exit()


def relay(link: EngineLink, core: EngineCore, gate: GrammarGate) -> None:
    while (message := link.recv()) is not None:
        if isinstance(message, Request):
            gate.submit(message)
        elif isinstance(message, Abort):
            gate.abort(message.request_id)
        elif isinstance(message, AdapterCall):
            core.submit_adapter_op(AdapterOp(message.name, message.path, _answer(link, message)))
        elif isinstance(message, Stop):
            return
        else:
            log.error("engine process: unknown message %r", type(message).__name__)


def _answer(link: EngineLink, call: AdapterCall) -> Future:
    done: Future = Future()

    def reply(f: Future) -> None:
        error = f.exception()
        message = None if error is None else f"{type(error).__name__}: {error}"
        link.send(AdapterDone(call.op_id, message))

    done.add_done_callback(reply)
    return done


class GrammarGate:
    """Requests whose grammar this process has not compiled yet wait here, off the engine
    thread. The API side compiled it to check the request, but elsewhere: a 12-deep anyOf takes
    0.6 s to compile, and every stream's step would wait for it on the engine thread.
    llguidance drops the GIL while it compiles (its schema-to-grammar step, ~85 ms for that
    anyOf, does not: the engine pauses that long, once per new schema)."""

    def __init__(self, core: EngineCore, grammars: Any) -> None:  # noqa: ANN401
        self.core = core
        self.grammars = grammars
        # Niced, not idle: a request waits for its compile, which must end under a busy engine.
        self._pool = ThreadPoolExecutor(
            GRAMMAR_WORKERS, "genserve-grammar", initializer=lower_priority, initargs=(10, False)
        )
        self._lock = threading.Lock()
        self._compiling: dict[str, bool] = {}  # request id -> aborted meanwhile

    def submit(self, request: Request) -> None:
        spec = request.params.grammar
        if spec is None or self.grammars.compiled(spec):
            self.core.submit(request)
            return
        with self._lock:
            self._compiling[request.request_id] = False
        self._pool.submit(self._compile_then_submit, request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._compiling:
                self._compiling[request_id] = True
                return
        self.core.abort(request_id)

    def _compile_then_submit(self, request: Request) -> None:
        # A spec it refuses is refused again by the worker at start, for this request alone.
        with contextlib.suppress(Exception):
            self.grammars.validate(request.params.grammar)
        with self._lock:
            aborted = self._compiling.pop(request.request_id)
        if not aborted:
            self.core.submit(request)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
