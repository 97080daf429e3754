"""The engine in a process of its own: EngineCore's interface over a pipe (vLLM V1's split of
API server and engine core).

Why: in one process the engine thread and the event loop share one GIL. A decode step makes
some 450 torch calls, each releasing the GIL and taking it back, while the event loop parses a
multi-MB body or a schema in calls that never let go: under a hostile mix (`bench/load.py
--hostile`) a 16-row step took 0.6 s of wall time for 0.05 s of CPU, the second core idle, and
the normal streams' first token came 3-7x later than without the mix. Here the engine's
Python runs under a GIL of its own; the API process only pickles requests and unpickles each
step's deltas.

Parent side: `EngineProcess` (what `AsyncEngine` drives, like `EngineCore`). Child side:
`serve_engine` runs the loop the parent's `main` callable builds (genserve.runtime.engine_main)
with the `EngineLink` it is given. Every message is a typed record below, pickled.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from genserve.engine.core import STOPPED, Abort, AdapterOp
from genserve.engine.thread import COMPILE_THREAD
from genserve.engine.types import (
    EngineStats,
    FailureKind,
    FinishReason,
    Request,
    RequestFailure,
    TokenDelta,
)

log = logging.getLogger(__name__)
START_TIMEOUT_S = 1800.0  # loading a big checkpoint from a slow disk (the parent waits this long)
STOP_TIMEOUT_S = 30.0
DIED = RequestFailure(
    "the engine process exited while this request ran; see the server log",
    FailureKind.UNAVAILABLE,
    "model",
)


# -- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AdapterCall:
    """Parent -> child: load (path set) or unload (path None) an adapter; answered once."""

    op_id: int
    name: str
    path: Path | None


@dataclass(frozen=True, slots=True)
class Stop:
    """Parent -> child: fail what is in flight, then exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Child -> parent, once: the engine is built and stepping; `info` is what main returned."""

    info: Any
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class StartFailed:
    """Child -> parent, instead of Ready: building the engine raised `error` (re-raised in
    the parent, so a ModelLoadError stays one)."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Published:
    """Child -> parent: one engine step's deltas (or one rejection) and the stats after it."""

    deltas: tuple[TokenDelta, ...]
    stats: EngineStats
    at: float  # the child's time.monotonic() when it sent them (one clock for the machine)


@dataclass(frozen=True, slots=True)
class AdapterDone:
    op_id: int
    error: str | None  # None: done


class EngineStartError(RuntimeError):
    """The engine process exited or hung before its engine was built."""


# -- parent side ------------------------------------------------------------------------------
class EngineProcess:
    """A child process running one EngineCore; `launch` waits until it steps.

    `main(link, *args)` runs in the child (it must be importable by name: the child is
    spawned, never forked from a process that already runs torch's threads)."""

    def __init__(self, main: Callable[..., None], *args: Any, name: str = "genserve-engine"):  # noqa: ANN401
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_child_main, args=(main, args, child_conn), name=name, daemon=True
        )
        self._child_conn = child_conn
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stats = EngineStats(0, 0, 0, 0, 0)
        self._live: set[str] = set()  # submitted, not yet finished: failed if the child dies
        self._ops: dict[int, Future] = {}
        self._next_op = 0
        self._stopping = False
        self.publish: Callable[[Sequence[TokenDelta]], None] = lambda _: None
        self.info: Any = None
        self.failure: str | None = None  # set when the child exits without being asked to
        self.last_published: Published | None = None  # the latest message read (its time)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def launch(self, timeout: float = START_TIMEOUT_S) -> Any:  # noqa: ANN401
        """Start the child and wait for its engine; returns main's info. Blocks: off-loop."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the child; `wait_ready` for its engine (do other work meanwhile)."""
        self._proc.start()
        self._child_conn.close()  # the child holds its end: EOF here once it exits

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Any:  # noqa: ANN401
        """Main's info once the child's engine steps; what building it raised, re-raised."""
        try:
            if not self._conn.poll(timeout):
                raise EngineStartError(f"the engine process did not start in {timeout:g}s")
            first = self._conn.recv()
        except (EOFError, OSError) as e:
            self._kill()
            code = self._proc.exitcode
            raise EngineStartError(f"the engine process exited while starting (code {code})") from e
        except BaseException:
            self._kill()
            raise
        if isinstance(first, StartFailed):
            self._proc.join(STOP_TIMEOUT_S)
            raise first.error
        assert isinstance(first, Ready), first
        self.info, self._stats = first.info, first.stats
        return first.info

    # -- what AsyncEngine calls (EngineCore's interface) --
    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="genserve-engine-link", daemon=True)
        self._reader.start()

    def submit(self, request: Request) -> None:
        self._live.add(request.request_id)
        if not self._send(request):
            self._fail([request.request_id], DIED)

    def abort(self, request_id: str) -> None:
        self._live.discard(request_id)  # the caller has forgotten it: nothing to fail later
        self._send(Abort(request_id))

    def submit_adapter_op(self, op: AdapterOp) -> None:
        self._next_op += 1
        self._ops[self._next_op] = op.done
        if not self._send(AdapterCall(self._next_op, op.name, op.path)):
            self._ops.pop(self._next_op)
            op.done.set_exception(RuntimeError(DIED.message))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_slots(self) -> int:
        return int(getattr(self.info, "num_slots", 1))

    def stop(self) -> None:
        """Ask the child to fail what it holds and exit; kill it if it does not in time."""
        self._stopping = True
        self._send(Stop())
        self._proc.join(STOP_TIMEOUT_S)
        if self._proc.is_alive():
            log.warning("the engine process did not stop in %ss; killing it", STOP_TIMEOUT_S)
            self._kill()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(STOP_TIMEOUT_S)
        self._conn.close()

    # -- internals --
    def _send(self, message: object) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the child is gone (or the pipe closed by stop)
            return False
        return True

    def _read(self) -> None:
        """The reader thread: each step's deltas to `publish`, until the child exits."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Published):
                self._stats, self.last_published = message.stats, message
                for d in message.deltas:
                    if d.finished:
                        self._live.discard(d.request_id)
                self.publish(message.deltas)
            elif isinstance(message, AdapterDone):
                self._adapter_done(message)
        self._child_gone()

    def _adapter_done(self, message: AdapterDone) -> None:
        done = self._ops.pop(message.op_id, None)
        if done is None:
            return
        if message.error is None:
            done.set_result(None)
        else:
            done.set_exception(RuntimeError(message.error))

    def _child_gone(self) -> None:
        """EOF: the child exited. Asked to, it failed its requests itself; otherwise (killed,
        out of memory, a crash in native code) they end here, never hang."""
        if not self._stopping:
            self._proc.join(5)  # its exit code, for the reason
            code = self._proc.exitcode
            self.failure = f"the engine process exited unexpectedly (exit code {code})"
            log.error("%s; its requests fail, /health says 503 until a restart", self.failure)
        self._fail(list(self._live), STOPPED if self._stopping else DIED)
        for done in self._ops.values():
            done.set_exception(RuntimeError(DIED.message))
        self._ops.clear()

    def _fail(self, request_ids: list[str], error: RequestFailure) -> None:
        deltas = [TokenDelta(r, (), "", FinishReason.ABORT, 0, 0, error=error) for r in request_ids]
        for r in request_ids:
            self._live.discard(r)
        if deltas:
            self.publish(deltas)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


# -- child side -------------------------------------------------------------------------------
class EngineLink:
    """The child's end of the pipe: what the engine publishes goes out, one lock for all the
    threads that send (the engine thread, adapter callbacks)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        try:
            with self._lock:
                self.conn.send(message)
        except (OSError, ValueError):
            pass  # the parent is gone: the receive loop sees EOF and stops the engine

    def fail_start(self, error: BaseException) -> None:
        """Tell the parent why the engine could not be built (as it was raised, if it pickles)."""
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception holding something that does not pickle
            error = RuntimeError(f"{type(error).__name__}: {error}")
        self.send(StartFailed(error))

    def recv(self) -> object | None:
        """The next message from the parent; None once it is gone."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None


def _child_main(main: Callable[..., None], args: tuple, conn: Connection) -> None:
    # The parent decides when the engine stops (after draining on SIGTERM): a Ctrl-C sent to
    # the whole process group must not kill the engine under requests still being drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link = EngineLink(conn)
    try:
        main(link, *args)
    finally:
        conn.close()
    if any(t.name == COMPILE_THREAD and t.is_alive() for t in threading.enumerate()):
        # A --compile-decode compile cannot be cancelled, and finalising the interpreter under
        # it aborted the process ("terminate called without an active exception") after a
        # wait: the engine has stopped and said so, so leave now.
        logging.shutdown()
        os._exit(0)
