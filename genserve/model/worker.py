"""The engine's one handle on the model: run a step, sample, keep per-request state."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.engine.kv_blocks import PagedShape
from genserve.engine.types import (
    ChunkInput,
    FailureKind,
    Request,
    RequestFailure,
    SampledToken,
    SamplingParams,
    StepInput,
    TokenLogprob,
)
from genserve.model.dispatch import make_runner
from genserve.model.grammar import GrammarLimitError, ThinkingGate
from genserve.model.hardware import KernelPolicy
from genserve.model.loading import LoadedModel
from genserve.model.runner import LlamaRunner, Runner
from genserve.model.sampler import SamplingRow, bias_tensors, sample, token_logprob

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestState:
    params: SamplingParams
    prompt: list[int]
    generator: torch.Generator
    counts: torch.Tensor | None = None  # generated-token counts, for presence/frequency
    seen: torch.Tensor | None = None  # prompt and generated tokens, for repetition_penalty
    grammar: Any = None  # genserve.model.grammar.GrammarMatcher
    prompt_logprobs: list[TokenLogprob | None] | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias, built once
    allowed: torch.Tensor | None = None  # [V] bool, allowed_token_ids, built once
    generated: list[int] | None = None  # the tokens so far, kept where bad_words read them


class ModelWorker:
    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int,
        max_len: int,
        fast_path: bool,
        batch_invariant: bool = True,
        grammars: Any = None,  # genserve.model.grammar.GrammarCompiler
        policy: KernelPolicy | None = None,  # measured kernels (genserve.model.hardware)
        paged: PagedShape | None = None,  # the KV block pool, on runners that page their cache
        compile_decode: bool = False,  # LlamaRunner: a lone decode as one compiled graph
        adaptive_threads: bool = True,  # LlamaRunner: decode steps' threads chosen as they run
    ) -> None:
        self.loaded = loaded
        self.runner: Runner = make_runner(
            loaded.model, num_slots, max_len, fast_path, batch_invariant, policy, paged,
            compile_decode, adaptive_threads,
        )  # fmt: skip
        if isinstance(self.runner, LlamaRunner):  # it holds its own copies of the weights
            self.runner.free_source_weights(loaded.model)
        self.vocab_size = loaded.model.config.vocab_size
        self.device = loaded.device  # the logits' device: the sampling state lives there too
        self.eos_ids = loaded.eos_token_ids
        self.grammars = grammars
        self._state: dict[str, RequestState] = {}
        self.adapters: set[str] = set()

    @property
    def compiled_decode(self) -> str:
        return self.runner.compiled_decode

    def start(self, request: Request) -> None:
        state = request_state(request, self.vocab_size, self.device)
        p = request.params
        if p.grammar is not None:
            state.grammar = self.grammars.matcher(p.grammar)
            if p.think_first is not None:  # a reasoning model thinks before its answer
                state.grammar = ThinkingGate(state.grammar, p.think_first)
        self._state[request.request_id] = state

    def add_adapter(self, name: str, path: Path) -> None:
        self.runner.add_adapter(name, path)
        self.adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        self.runner.remove_adapter(name)
        self.adapters.discard(name)

    def release(self, request_id: str, slot: int) -> None:
        self._state.pop(request_id, None)
        if slot >= 0:
            self.runner.release(slot)

    def prompt_logprobs(self, request_id: str) -> list[TokenLogprob | None] | None:
        return self._state[request_id].prompt_logprobs

    def execute(self, step: StepInput) -> list[SampledToken]:
        """One SampledToken per chunk with `sample`, in chunk order."""
        logits = self.runner.execute(step)
        sampling = [c for c in step.chunks if c.sample]
        self._collect_prompt_logprobs(step, logits)
        last = logits[self._last_rows(step)] if _has_prompt_rows(step) else logits
        rows = [self._row(c) for c in sampling]
        out = sample(last, rows)
        picked = zip(sampling, out.tokens, out.logprobs, strict=True)
        return [
            self._failed(c, out.errors[i]) if i in out.errors else self._record(c, t, lp)
            for i, (c, t, lp) in enumerate(picked)
        ]

    @staticmethod
    def _failed(chunk: ChunkInput, exc: Exception) -> SampledToken:
        log.warning("request %s failed while sampling: %r", chunk.request_id, exc)
        return SampledToken(-1, error=failure_of(exc))

    def _row(self, chunk: ChunkInput) -> SamplingRow:
        p = chunk.params
        state = self._state[chunk.request_id]
        suppress: tuple[int, ...] = ()
        if chunk.num_generated < p.min_tokens:
            suppress = self.eos_ids + p.stop_token_ids
        if state.generated is not None:
            suppress += bad_word_bans(p.bad_words_token_ids, state.generated)
        return SamplingRow(
            p,
            generator=state.generator,
            suppress=suppress,
            counts=state.counts,
            seen=state.seen,
            constraint=_constraint(state.grammar),
            bias=state.bias,
            allowed=state.allowed,
        )

    def _record(self, chunk: ChunkInput, token: int, logprob: TokenLogprob | None) -> SampledToken:
        state = self._state[chunk.request_id]
        if state.counts is not None:
            state.counts[token] += 1
        if state.seen is not None:
            state.seen[token] = True
        if state.generated is not None:
            state.generated.append(token)
        done = False
        if state.grammar is not None and token not in self.eos_ids:
            try:
                state.grammar.advance(token)
                done = state.grammar.done
            except Exception as e:  # noqa: BLE001 - this request fails, not the step
                return self._failed(chunk, e)
        return SampledToken(token, logprob, grammar_done=done)

    # -- prompt logprobs (echo with logprobs) ----------------------------------------------
    @staticmethod
    def _last_rows(step: StepInput) -> list[int]:
        """Index, among the returned logit rows, of each sampling chunk's last row."""
        rows, row = [], 0
        for c in step.chunks:
            row += c.num_logit_rows
            if c.sample:
                rows.append(row - 1)
        return rows

    def _collect_prompt_logprobs(self, step: StepInput, logits: torch.Tensor) -> None:
        """Row j of a chunk predicts prompt token start+j+1, which the prompt already holds."""
        row = 0
        for c in step.chunks:
            if c.params.prompt_logprobs is not None:
                state = self._state[c.request_id]
                for j in range(len(c.token_ids)):
                    nxt = c.start + j + 1
                    # nxt past what is recorded: a preempted request's recomputed prompt
                    # has its logprobs already.
                    if nxt < len(state.prompt) and nxt == len(state.prompt_logprobs):
                        k = c.params.prompt_logprobs
                        state.prompt_logprobs.append(
                            token_logprob(logits[row + j], state.prompt[nxt], k)
                        )
            row += c.num_logit_rows


def request_state(request: Request, vocab_size: int, device: torch.device) -> RequestState:
    """A request's sampling state. Its generator is a CPU one, seeded, so a seed draws the same
    numbers on any device; its tensors are on `device`, the logits': a penalty or a bias
    built on the CPU beside CUDA logits fails the step (and every request in it)."""
    p = request.params
    gen = torch.Generator(device="cpu")
    # OpenAI's seeds are signed 64-bit; a generator takes the same 64 bits unsigned.
    gen.manual_seed(p.seed & 0xFFFF_FFFF_FFFF_FFFF if p.seed is not None else secrets.randbits(63))
    state = RequestState(p, request.prompt_token_ids, gen)
    if p.presence_penalty or p.frequency_penalty:
        state.counts = torch.zeros(vocab_size, device=device)
    if p.repetition_penalty != 1.0:
        state.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        state.seen[request.prompt_token_ids] = True
    if p.prompt_logprobs is not None:
        state.prompt_logprobs = [None]  # the first prompt token has no context
    if p.logit_bias:
        state.bias = bias_tensors(p.logit_bias, device)
    if p.allowed_token_ids is not None:
        state.allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        state.allowed[list(p.allowed_token_ids)] = True
    if p.bad_words_token_ids:
        state.generated = []
    return state


def bad_word_bans(words: tuple[tuple[int, ...], ...], generated: list[int]) -> tuple[int, ...]:
    """vLLM's bad_words: a word's last token is banned where the tokens before it are the
    last ones generated (the prompt does not count); a one-token word is banned always. A
    loop over the words, never the vocabulary."""
    out = []
    for ids in words:
        before = len(ids) - 1
        if before <= len(generated) and tuple(generated[len(generated) - before :]) == ids[:-1]:
            out.append(ids[-1])
    return tuple(out)


def _constraint(grammar: Any) -> Any:  # noqa: ANN401 - a GrammarMatcher or a ThinkingGate
    """No constraint while a reasoning model thinks: the row keeps the sampler's unmasked
    path, as a request without a grammar does."""
    if isinstance(grammar, ThinkingGate) and grammar.thinking:
        return None
    return grammar


def failure_of(exc: Exception) -> RequestFailure:
    """A grammar past its limits is the caller's schema (400); anything else is ours (500)."""
    if isinstance(exc, GrammarLimitError):
        return RequestFailure(str(exc), FailureKind.INVALID, "response_format")
    return RequestFailure(f"generation failed: {type(exc).__name__}: {exc}")


def _has_prompt_rows(step: StepInput) -> bool:
    return any(c.params.prompt_logprobs is not None for c in step.chunks)
