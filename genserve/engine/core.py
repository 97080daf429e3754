"""The engine loop, on its own thread: step() = schedule -> execute -> update -> publish."""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from genserve.engine.detokenizer import Decoder, IncrementalDetokenizer
from genserve.engine.kv_blocks import KVCacheManager
from genserve.engine.memory import keep_step_allocations, trimmer
from genserve.engine.scheduler import (
    Scheduler,
    SchedulerOutput,
    SeqStatus,
)
from genserve.engine.scheduler import (
    Sequence as Seq,
)
from genserve.engine.thread import EngineThread
from genserve.engine.types import (
    ChunkInput,
    EngineStats,
    FailureKind,
    FinishReason,
    Request,
    RequestFailure,
    RequestTimes,
    SampledToken,
    StepInput,
    TokenDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)
QUIET_S = 1.0  # idle this long after work: give freed heap memory back (engine/memory.py)
COMPILE_POLL_S = 1.0  # idle while the decode compiles: look this often whether it is ready
STOPPED = RequestFailure(
    "the model was unloaded (or its engine stopped) while this request ran; retry on a "
    "model that is served",
    FailureKind.UNAVAILABLE,
    "model",
)


class Worker(Protocol):
    """What the engine needs of the model side (genserve.model.worker.ModelWorker)."""

    eos_ids: tuple[int, ...]
    adapters: set[str]
    compiled_decode: str  # --compile-decode's state: "off", "compiling", "ready", "failed"

    def start(self, request: Request) -> None: ...

    def prompt_logprobs(self, request_id: str) -> list[TokenLogprob | None] | None: ...

    def release(self, request_id: str, slot: int) -> None: ...

    def add_adapter(self, name: str, path: Path) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def execute(self, step: StepInput) -> list[SampledToken]: ...


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class AdapterOp:
    """Load (path set) or unload (path None) a LoRA adapter between two steps."""

    name: str
    path: Path | None
    done: Future  # concurrent.futures.Future: the caller awaits the outcome


@dataclass(slots=True)
class Live:
    """Engine-side state of one request beyond what the scheduler tracks."""

    seq: Seq
    detok: IncrementalDetokenizer
    held: TokenDelta | None = None  # tokens not sent on yet (Request.publish_every)

    def with_held(self, delta: TokenDelta) -> TokenDelta:
        """`delta` after what was held (then nothing is): the next one sent carries both."""
        held, self.held = self.held, None
        return delta if held is None else held.followed_by(delta)


Publish = Callable[[Sequence[TokenDelta]], None]


def _times(seq: Seq, reason: FinishReason | None) -> RequestTimes | None:
    """A request's phases once it has ended (with the delta that says so), else None."""
    return None if reason is None else seq.times(time.monotonic())


def unloaded(model: str) -> RequestFailure:
    return RequestFailure(f"the model {model!r} was unloaded", FailureKind.UNAVAILABLE, "model")


class EngineCore:
    def __init__(
        self,
        worker: Worker,
        decoder: Decoder,
        num_slots: int,
        token_budget: int,
        publish: Publish,
        batch_invariant: bool = True,
        thread: EngineThread | None = None,
        kv: KVCacheManager | None = None,  # None: no bound on tokens (tests of batching alone)
    ) -> None:
        self.worker = worker
        # The thread that built the worker, when one did (see genserve.engine.thread).
        self.thread = thread
        self.decoder = decoder
        # Every running sequence must be able to decode each step, whatever the budget says.
        self.scheduler = Scheduler(
            num_slots, max(token_budget, num_slots + 16), aligned_chunks=batch_invariant, kv=kv
        )
        self.publish = publish
        self.inbox: queue.SimpleQueue[Request | Abort | None] = queue.SimpleQueue()
        self.live: dict[str, Live] = {}
        self.steps = 0
        self._trim = trimmer()
        keep_step_allocations()  # the model is loaded: from here, steps reuse freed pages
        self._trimmed_at = 0  # self.steps when freed memory was last given back
        self._compiled_said = worker.compiled_decode  # as the stats last published said

    @property
    def num_slots(self) -> int:
        return self.scheduler.slots.num_slots

    @property
    def pid(self) -> int:
        """The process running the model: this one (genserve.engine.process has another)."""
        return os.getpid()

    failure: str | None = None  # a thread of this process does not die alone

    # -- called from any thread -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    def abort(self, request_id: str) -> None:
        self.inbox.put(Abort(request_id))

    def start(self) -> None:
        if self.thread is None:
            self.thread = EngineThread()
        self.thread.submit(self._run)  # _run reports its own failures; nothing waits on it

    def stop(self) -> None:
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.close(timeout=30)

    def stats(self) -> EngineStats:
        s = self.scheduler
        kv = s.kv.stats()
        return EngineStats(
            len(s.running), len(s.waiting), kv.blocks_used, kv.blocks_total, self.steps,
            kv.queries, kv.hits, s.num_preempted, self.worker.compiled_decode,
        )  # fmt: skip

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._drain_inbox(block=not self.scheduler.has_work, timeout=self._quiet()):
                    break
                if self.scheduler.has_work:
                    self.step()
                elif self.steps != self._trimmed_at:  # a quiet second after work
                    self._trim()
                    self._trimmed_at = self.steps
                self._say_compiled()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                # Per-request failures (sampling, grammar, detokenizing) never get here; what
                # does is the model's forward pass itself, which every request in it shared.
                log.exception("engine step failed; failing the requests in it")
                self._fail_all(RequestFailure(f"the model's forward pass failed: {e!r}"))
        self._fail_all(STOPPED)  # stopped: what was in flight ends with an error, never hangs
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Requests submitted after the stop: each ends with the same error."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Request):
                self._reject(item, STOPPED)
            elif isinstance(item, AdapterOp):
                item.done.set_exception(RuntimeError(STOPPED.message))

    def _quiet(self) -> float | None:
        """How long an idle engine waits before giving freed memory back (None: nothing to
        give back since the last time, so it waits for work without a timeout), or before
        looking again whether the decode it compiles is ready."""
        if self._compiled_said == "compiling":  # until the change is published
            return COMPILE_POLL_S
        return QUIET_S if self.steps != self._trimmed_at else None

    def _say_compiled(self) -> None:
        """Stats travel with what the engine publishes: when the compiled decode's state
        changes, an empty publish carries it (to /health) even if no request runs."""
        if self.worker.compiled_decode != self._compiled_said:
            self._compiled_said = self.worker.compiled_decode
            self.publish([])

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued submits and aborts; False when asked to stop. Blocking, wait at most
        `timeout` seconds for the first item."""
        while True:
            try:
                item = self.inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, Abort):
                self._abort(item.request_id)
            elif isinstance(item, AdapterOp):
                self._adapter_op(item)
            else:
                self._add(item)

    def submit_adapter_op(self, op: AdapterOp) -> None:
        self.inbox.put(op)

    def _adapter_op(self, op: AdapterOp) -> None:
        try:
            if op.path is None:
                # Requests still using it end now (their clients see an error), never mid-swap.
                for rid, live in list(self.live.items()):
                    if live.seq.request.adapter == op.name:
                        self._abort(rid, unloaded(op.name))
                self.worker.remove_adapter(op.name)
            else:
                self.worker.add_adapter(op.name, op.path)
            # Either way, what was cached under this name is stale (a new adapter may reuse it).
            self.scheduler.kv.forget_adapter(op.name)
        except Exception as e:  # noqa: BLE001 - the caller gets it, the engine goes on
            op.done.set_exception(e)
        else:
            op.done.set_result(None)

    def _add(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.worker.adapters:
            # Its adapter was removed after the API accepted it: end it alone, not the step.
            self._reject(request, unloaded(request.adapter))
            return
        try:
            # First, so a failure (a grammar the engine cannot build) leaves nothing to undo.
            self.worker.start(request)
        except Exception as e:  # noqa: BLE001 - this request fails, not the engine
            log.warning("request %s failed to start: %r", request.request_id, e)
            self.worker.release(request.request_id, -1)
            self._reject(request, RequestFailure(f"the request could not start: {e}"))
            return
        seq = self.scheduler.add(request)
        self.live[request.request_id] = Live(seq, self._detokenizer(request))

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        p = request.params
        tail = request.prompt_token_ids[-5:]
        return IncrementalDetokenizer(
            self.decoder, tail, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
        )

    def _reject(self, request: Request, error: RequestFailure) -> None:
        """End a request that never ran; its stream sees ABORT with the reason."""
        prompt = len(request.prompt_token_ids)
        delta = TokenDelta(request.request_id, (), "", FinishReason.ABORT, prompt, 0, error=error)
        self.publish([delta])

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return
        try:
            tokens = self.worker.execute(self._model_input(batch))
        finally:
            self.scheduler.kv.copied(batch.copies)
        deltas = self._update(batch, tokens)
        self.steps += 1
        if deltas:
            self.publish(deltas)

    def _model_input(self, batch: SchedulerOutput) -> StepInput:
        table = self.scheduler.block_table
        return StepInput(
            tuple(
                ChunkInput(
                    request_id=c.seq.request_id,
                    slot=c.seq.slot,
                    token_ids=tuple(c.seq.token_slice(c.start, c.end)),
                    start=c.start,
                    sample=c.sample,
                    params=c.seq.request.params,
                    num_generated=len(c.seq.output_ids),
                    adapter=c.seq.request.adapter,
                    blocks=table(c.seq),
                )
                for c in batch.chunks
            ),
            batch.copies,
        )

    def _update(self, batch: SchedulerOutput, tokens: list[SampledToken]) -> list[TokenDelta]:
        sampled = iter(tokens)
        deltas = []
        for chunk in batch.chunks:
            self.scheduler.commit(chunk)
            if chunk.sample and (delta := self._append(chunk.seq, next(sampled))) is not None:
                deltas.append(delta)
        return deltas

    @staticmethod
    def _outbox(live: Live, delta: TokenDelta) -> TokenDelta | None:
        """The delta to send now (with the tokens held before it), or None: held. Each delta
        sent wakes the API process, and with it the client, on cores the step is using: one
        int8 stream served 1.15x faster sending every fourth token (2-core EPYC, paired)."""
        delta = live.with_held(delta)
        every = live.seq.request.publish_every
        due = delta.completion_tokens - len(delta.token_ids) == 0  # the first token: at once
        if delta.finished or due or (every and delta.completion_tokens % every == 0):
            return delta
        live.held = delta
        return None

    def _append(self, seq: Seq, sampled: SampledToken) -> TokenDelta | None:
        live = self.live[seq.request_id]
        if sampled.error is not None:
            return self._failed(live, sampled.error)
        if seq.request.params.max_tokens == 0:
            return self._scored(live)
        seq.output_ids.append(sampled.token_id)
        try:
            reason, text = self._outcome(live, sampled)
        except Exception as e:  # noqa: BLE001 - a detokenizer failure ends this request alone
            log.warning("request %s failed while detokenizing: %r", seq.request_id, e)
            return self._failed(live, RequestFailure(f"detokenizing failed: {e!r}"))
        first = len(seq.output_ids) == 1
        if first:
            seq.first_token_at = time.monotonic()
        delta = TokenDelta(
            seq.request_id,
            (sampled.token_id,),
            text,
            reason,
            len(seq.request.prompt_token_ids),
            len(seq.output_ids),
            logprobs=(sampled.logprob,) if sampled.logprob is not None else (),
            prompt_logprobs=self._prompt_logprobs(seq) if first else (),
            cached_tokens=seq.num_cached or 0,
            times=_times(seq, reason),
        )
        if reason is not None:
            self._release(live)
        return self._outbox(live, delta)

    def _scored(self, live: Live) -> TokenDelta:
        """max_tokens 0: the prompt was run for its logprobs; the token drawn after it is
        dropped, and the request ends with none generated."""
        seq = live.seq
        delta = TokenDelta(
            seq.request_id, (), "", FinishReason.LENGTH, len(seq.request.prompt_token_ids), 0,
            prompt_logprobs=self._prompt_logprobs(seq), cached_tokens=seq.num_cached or 0,
            times=_times(seq, FinishReason.LENGTH),
        )  # fmt: skip
        self._release(live)
        return delta

    def _prompt_logprobs(self, seq: Seq) -> tuple:
        """The prompt's logprobs, sent with a request's first delta when it asked for them."""
        if seq.request.params.prompt_logprobs is None:
            return ()
        return tuple(self.worker.prompt_logprobs(seq.request_id) or ())

    def _outcome(self, live: Live, sampled: SampledToken) -> tuple[FinishReason | None, str]:
        """Why the sequence ends with this token (None: it goes on), and the text to send."""
        seq, token = live.seq, sampled.token_id
        params = seq.request.params
        eos = token in self.worker.eos_ids and not params.ignore_eos
        if eos or token in params.stop_token_ids:
            # The stop token's own text is not part of the answer unless asked for (vLLM's
            # include_stop_str_in_output; a special token's is still skipped); held-back text is.
            text = live.detok.push(token).text if params.include_stop_str_in_output else ""
            return FinishReason.STOP, text + live.detok.flush()
        out = live.detok.push(token)
        if out.stopped:
            return FinishReason.STOP, out.text
        if sampled.grammar_done:  # the structured output is complete
            return FinishReason.STOP, out.text + live.detok.flush()
        if len(seq.output_ids) >= params.max_tokens:
            return FinishReason.LENGTH, out.text + live.detok.flush()
        return None, out.text

    def _release(self, live: Live) -> None:
        seq = live.seq
        slot = seq.slot if seq.status is SeqStatus.RUNNING else -1
        self.scheduler.finish(seq)
        self.worker.release(seq.request_id, slot)
        del self.live[seq.request_id]

    def _failed(self, live: Live, error: RequestFailure | None) -> TokenDelta:
        """Release one request that failed in this step; its delta carries why."""
        self._release(live)
        seq = live.seq
        prompt, done = len(seq.request.prompt_token_ids), len(seq.output_ids)
        delta = TokenDelta(seq.request_id, (), "", FinishReason.ABORT, prompt, done, error=error)
        return live.with_held(delta)  # what it held goes with it

    def _abort(self, request_id: str, error: RequestFailure | None = None) -> None:
        """Drop a request (client gone, or a failed step); its stream, if any, sees ABORT."""
        live = self.live.get(request_id)
        if live is None:
            return
        self.publish([self._failed(live, error)])

    def _fail_all(self, error: RequestFailure) -> None:
        for request_id in list(self.live):
            self._abort(request_id, error)
