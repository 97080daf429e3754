"""The engine's one handle on the model: run a step, sample, keep per-request generators."""

from __future__ import annotations

import secrets

import torch

from genserve.engine.types import ChunkInput, StepInput
from genserve.model.loading import LoadedModel
from genserve.model.runner import Runner, make_runner
from genserve.model.sampler import SamplingRow, sample


class ModelWorker:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_len: int, fast_path: bool) -> None:
        self.loaded = loaded
        self.runner: Runner = make_runner(loaded.model, num_slots, max_len, fast_path)
        self.eos_ids = loaded.eos_token_ids
        self._generators: dict[str, torch.Generator] = {}

    def start(self, request_id: str, seed: int | None) -> None:
        """Every request gets its own generator; an unseeded one gets a fresh random seed."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        self._generators[request_id] = gen

    def release(self, request_id: str, slot: int) -> None:
        self._generators.pop(request_id, None)
        if slot >= 0:
            self.runner.release(slot)

    def execute(self, step: StepInput) -> list[int]:
        """Token ids sampled for the chunks with `sample`, in their order."""
        logits = self.runner.execute(step)
        rows = [self._row(c) for c in step.chunks if c.sample]
        return sample(logits, rows)

    def _row(self, chunk: ChunkInput) -> SamplingRow:
        p = chunk.params
        suppress: tuple[int, ...] = ()
        if chunk.num_generated < p.min_tokens:
            suppress = self.eos_ids + p.stop_token_ids
        return SamplingRow(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            generator=self._generators[chunk.request_id],
            suppress=suppress,
        )
