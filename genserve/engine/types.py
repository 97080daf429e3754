"""Typed records that cross the engine's queue and thread boundaries."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # the client went away; never sent to a client


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding controls. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True)
class Request:
    """One sequence to generate. `n` > 1 at the API becomes n requests."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """What one engine step produced for one request: new tokens and the text they complete."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /health, metrics and tests."""

    num_running: int
    num_waiting: int
    kv_slots_used: int
    kv_slots_total: int
    steps: int


@dataclass(frozen=True, slots=True)
class ChunkInput:
    """Tokens of one sequence that run in this step, at positions start..start+len-1."""

    request_id: str
    slot: int
    token_ids: tuple[int, ...]
    start: int
    sample: bool  # a new token is sampled after the last of these
    params: SamplingParams
    num_generated: int  # tokens generated so far (min_tokens suppresses EOS until reached)


@dataclass(frozen=True, slots=True)
class StepInput:
    """Everything the model worker needs for one engine step."""

    chunks: tuple[ChunkInput, ...]
