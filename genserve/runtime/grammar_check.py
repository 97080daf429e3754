"""A request's grammar (response_format, a tool-call grammar) checked before the engine gets
it: parsed, checked and compiled within GRAMMAR_BUDGET_S, so a schema llguidance cannot enforce
is a 400 at request time, never a failure mid-decode. One that runs past the budget is refused
and remembered as refused.

Two homes for that work. `LocalChecks`: threads of the API process, for an engine on a thread of
it (its worker then reuses the compiled grammar). `HelperChecks`: a helper process, for an
engine in a process of its own. The parse of a schema and llguidance's grammar_from_json_schema
hold the GIL in calls that never let go: under `bench/load.py --hostile` the 12-deep anyOf's
held the API process's GIL for 0.6 s at a time (0.37 s of CPU on a contended core), and every
stream's deltas, read from the engine process, waited for it; the first tokens came 3.7x later
than without the attacks. In a process of its own it only costs CPU, at a lower priority.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from genserve.engine.types import GrammarSpec, UnsupportedSchemaError
from genserve.model.grammar import GrammarCompiler, GrammarUnavailable, TokenizerJSON
from genserve.runtime import heap
from genserve.runtime.limits import GRAMMAR_BUDGET_S, BackgroundPool, lower_priority, off_loop

log = logging.getLogger(__name__)
REMEMBERED = 256  # checked specs whose outcome the helper's caller keeps
HELPER_START_S = 300.0  # the helper loads the tokenizer: seconds, more on a busy machine
HELPER_NICENESS = 10


class GrammarChecks(Protocol):
    state: str  # "ready", "starting" or "stopped", for /health

    async def check(self, spec: GrammarSpec) -> None:
        """Return once `spec` can be enforced; UnsupportedSchemaError saying why not."""

    def close(self) -> None: ...


def past_budget() -> str:
    return f"the schema did not compile within {GRAMMAR_BUDGET_S:g}s"


class LocalChecks:
    """Parsed at normal priority on a worker thread (it holds the GIL: see
    GrammarCompiler.prepare), compiled on the low-priority pool (llguidance drops the GIL)."""

    state = "ready"

    def __init__(self, compiler: Any, pool: BackgroundPool | None = None) -> None:  # noqa: ANN401
        self.compiler = compiler  # GrammarCompiler, or GrammarUnavailable
        self._pool = pool or BackgroundPool()

    async def check(self, spec: GrammarSpec) -> None:
        async def compile_it() -> None:
            text = await off_loop(self.compiler.prepare, spec)
            await self._pool.run(self.compiler.validate, spec, text)

        try:
            await asyncio.wait_for(compile_it(), GRAMMAR_BUDGET_S)
        except TimeoutError as e:
            self.compiler.refuse(spec, past_budget())
            raise UnsupportedSchemaError(past_budget()) from e

    def close(self) -> None:
        self._pool.shutdown()


class HelperChecks:
    """The checks in a helper process, niced 10. `start` once the engine is up: it loads the
    tokenizer in the background (seconds; a check that comes first waits for it, outside the
    budget). Started by the first check instead, the hostile bench's streams paid for its start
    (TTFT 3-4x) and its ~300 MB looked like a leak. Niced, not idle: a legitimate schema must
    compile within its budget on a server kept busy by its streams, and under SCHED_IDLE it got
    no core for seconds. Outcomes are remembered here, refusals included."""

    def __init__(self, tokenizer: TokenizerJSON | str, vocab: int, eos_ids: tuple[int, ...]):
        """`tokenizer`: the model's, serialized; or why llguidance cannot read it."""
        self._args = (tokenizer, vocab, eos_ids)
        self._outcomes: OrderedDict[GrammarSpec, str | None] = OrderedDict()
        self._pool: ProcessPoolExecutor | None = None
        self._ready: Future | None = None

    def _start(self) -> tuple[ProcessPoolExecutor, Future]:
        pool = ProcessPoolExecutor(
            1, multiprocessing.get_context("spawn"), initializer=_helper_init,
            initargs=(*self._args, os.getpid()),
        )  # fmt: skip
        return pool, pool.submit(_helper_ping)

    def start(self) -> None:
        """Start the helper now, without waiting for it."""
        if self._pool is None:
            self._pool, self._ready = self._start()

    @property
    def state(self) -> str:
        """For /health: "starting", "ready", or "stopped" (not started, or closed)."""
        if self._ready is None:
            return "stopped"
        return "ready" if self._ready.done() else "starting"

    async def check(self, spec: GrammarSpec) -> None:
        if spec in self._outcomes:
            self._outcomes.move_to_end(spec)
            outcome = self._outcomes[spec]
        else:
            outcome = await self._ask(spec)
            self._outcomes[spec] = outcome
            while len(self._outcomes) > REMEMBERED:
                self._outcomes.popitem(last=False)
        if outcome is not None:
            raise UnsupportedSchemaError(outcome)

    async def _ask(self, spec: GrammarSpec) -> str | None:
        self.start()
        assert self._pool is not None and self._ready is not None
        try:
            # Its start is not the request's fault: the budget counts from here.
            await asyncio.wait_for(asyncio.wrap_future(self._ready), HELPER_START_S)
            answer = self._pool.submit(_helper_check, spec)
            return await asyncio.wait_for(asyncio.wrap_future(answer), GRAMMAR_BUDGET_S)
        except TimeoutError:
            # The helper goes on until llguidance's own limits stop it; later checks queue.
            return past_budget()
        except BrokenProcessPool:
            log.error("the grammar helper process died; the next check starts another")
            self.close()
            return "the grammar checker stopped while checking this schema; retry"

    def close(self) -> None:
        if self._pool is not None:
            # Nothing the helper holds is worth waiting for (outcomes are kept here), and one
            # still loading its tokenizer held the server's exit for seconds: it is ended.
            # (Python 3.14's ProcessPoolExecutor.terminate_workers does the same.)
            helpers = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in helpers:
                process.terminate()
            self._pool = self._ready = None


def compiler_for(
    tokenizer: Any,  # noqa: ANN401
    vocab: int,
    eos_ids: tuple[int, ...],
) -> GrammarCompiler | GrammarUnavailable:
    """The grammar compiler for a tokenizer (a transformers one or its TokenizerJSON), or what
    stands in for it and says why not (given that reason as a str, or when llguidance fails):
    the model serves on and response_format answers 400 with the reason."""
    if isinstance(tokenizer, str):
        return GrammarUnavailable(tokenizer)
    try:
        return GrammarCompiler(tokenizer, vocab, stop_token_ids=eos_ids)
    except Exception as e:  # noqa: BLE001 - an optional capability, never the whole model
        return GrammarUnavailable(str(e))


def serialized_tokenizer(tokenizer: Any) -> TokenizerJSON | str:  # noqa: ANN401
    """What HelperChecks takes: the tokenizer serialized, or why llguidance cannot read it."""
    try:
        return TokenizerJSON.of(tokenizer)
    except Exception as e:  # noqa: BLE001 - reported by response_format, as the compiler's
        return str(e)


# -- in the helper process ------------------------------------------------------------------
_compiler: Any = None  # GrammarCompiler, or GrammarUnavailable


def _helper_init(
    tokenizer: TokenizerJSON | str, vocab: int, eos_ids: tuple[int, ...], parent: int
) -> None:
    global _compiler
    lower_priority(HELPER_NICENESS, idle=False)  # first: its start must not slow the streams
    _exit_with_parent(parent)
    _compiler = compiler_for(tokenizer, vocab, eos_ids)
    heap.settle()  # it lives as long as the server; its exit then walks nothing


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A pool worker waits on a queue whose pipe it holds both ends of, so a server killed
    with SIGKILL left it waiting forever (found three such helpers, each ~310 MB, after a test
    run): a thread here ends the process once its parent is gone. `parent` is the pid the
    server gave, not getppid() read here: a server killed while the helper started had
    already left it to init, and the helper then watched init (one found alive 30 min after
    a test run)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="genserve-parent-watch", daemon=True).start()


def _helper_ping() -> None:
    """The first task: done once the initializer has built the compiler."""


def _helper_check(spec: GrammarSpec) -> str | None:
    try:
        _compiler.validate(spec)
    except UnsupportedSchemaError as e:
        return str(e)
    return None
