"""Issue 20, item 1: every tensor sampling and LoRA use lives on the logits' device, and a
step's results come back to the host in one copy.

Run on `meta` (tests/devices.py): bookkeeping built on the CPU beside meta logits raises, as it
would beside CUDA logits, and any read of a value that bypasses sampler.to_host raises too.
Where CUDA exists the same tests run there with real numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from genserve.engine.types import GrammarSpec, Request, SamplingParams
from genserve.model import sampler
from genserve.model.grammar import GrammarCompiler
from genserve.model.lora import Adapter, LoraSet, LoraStack
from genserve.model.sampler import SamplingRow, sample
from genserve.model.worker import request_state
from tests.devices import PLACEMENT
from tests.tiny_model import build_tokenizer

VOCAB = 300


@pytest.fixture(params=PLACEMENT)
def device(request, monkeypatch) -> str:
    """On meta, to_host answers with ones of the right length (a token id, a finite row) and
    False for a flag: the numbers are not the point, the places are (everything else that
    reads a value off a meta tensor raises)."""
    if request.param == "meta":
        real = sampler.to_host

        def fake(t: torch.Tensor) -> list | int:
            if t.device.type != "meta":
                return real(t)
            if not t.dim():
                return False if t.dtype == torch.bool else 1
            return [1.0] * t.numel()

        monkeypatch.setattr(sampler, "to_host", fake)
    return request.param


def state_row(params: SamplingParams, device: str, prompt=(1, 2, 3)) -> SamplingRow:
    """A row as the worker builds it: state from request_state on the worker's device."""
    gen_seed = dataclasses.replace(params, seed=7)
    state = request_state(Request("r", list(prompt), gen_seed), VOCAB, torch.device(device))
    return SamplingRow(
        params, state.generator, counts=state.counts, seen=state.seen, bias=state.bias
    )


ROWS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, logit_bias=((3, 5.0), (7, -100.0)), logprobs=3),
    SamplingParams(temperature=0.0, logprobs=0),
]


def test_request_state_is_built_on_the_logits_device(device: str) -> None:
    params = SamplingParams(
        presence_penalty=0.5, repetition_penalty=1.2, logit_bias=((4, 1.0),), seed=1
    )
    state = request_state(Request("r", [5, 6], params), VOCAB, torch.device(device))
    for t in (state.counts, state.seen, *state.bias):
        assert t.device.type == device
    assert state.generator.device.type == "cpu"  # a seed draws the same numbers anywhere


def test_a_mixed_step_samples_on_the_logits_device_with_one_copy(device, monkeypatch) -> None:
    copies: list[int] = []
    inner = sampler.to_host
    monkeypatch.setattr(sampler, "to_host", lambda t: copies.append(t.numel()) or inner(t))
    rows = [state_row(p, device) for p in ROWS]
    rows.append(SamplingRow(SamplingParams(temperature=1.0), suppress=(0, 1)))
    logits = torch.randn(len(rows), VOCAB).to(device)
    out = sample(logits, rows)
    assert len(copies) == 1, f"{len(copies)} device->host copies in one step, not 1"
    assert len(out.tokens) == len(rows) and not out.errors
    assert out.logprobs[5] is not None and len(out.logprobs[5].top) == 3


def test_top_k_costs_one_more_copy_for_its_ties(device, monkeypatch) -> None:
    """Whether a tie at the k-th logit runs past k is read on the host (rare, and resolving it
    needs the row's ids); a step with top_k rows makes two copies, not one per row."""
    copies: list[int] = []
    inner = sampler.to_host
    monkeypatch.setattr(sampler, "to_host", lambda t: copies.append(t.numel()) or inner(t))
    rows = [state_row(SamplingParams(temperature=0.7, top_k=k, top_p=0.9), device)
            for k in (2, 5, 40)]  # fmt: skip
    out = sample(torch.randn(3, VOCAB).to(device), rows)
    assert len(copies) == 2 and not out.errors


def test_penalties_and_bias_run_beside_logits_on_the_device(device: str) -> None:
    """process() alone: the step that failed every request on CUDA (issue 20)."""
    rows = [state_row(p, device) for p in ROWS[3:6]]
    logits = torch.randn(3, VOCAB).to(device)
    processed, errors = sampler.process(logits, rows)
    assert not errors and processed.device.type == device


def test_a_grammar_mask_applies_to_a_row_on_the_device(device: str, tmp_path) -> None:
    tok = build_tokenizer(tmp_path)
    matcher = GrammarCompiler(tok, len(tok)).matcher(GrammarSpec.json_object())
    row = torch.zeros(len(tok), device=device)
    matcher.apply(row)
    assert row.device.type == device


def test_fused_lora_owner_mask_is_on_the_base_model_device(device: str) -> None:
    """Adapters are read on the CPU; the fused path's owner index must follow the base model."""

    def make_linear(w: torch.Tensor):
        w = w.to(device)
        return lambda x, pad=False: F.linear(x, w)

    lora = LoraSet(make_linear=make_linear, device=device)
    for seed, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
        stack = LoraStack(make_linear(a), make_linear(b), slice(0, 8), a, b)
        lora.add(Adapter(name, ({"qkv": stack},)))
    h, y = torch.randn(4, 16).to(device), torch.zeros(4, 24).to(device)
    owner = torch.tensor([0, 1, -1, 0], device=device)
    lora.apply_fused(0, "qkv", h, y, owner)
    assert y.device.type == device
    if device != "meta":  # real numbers: the row without an adapter is untouched
        assert torch.count_nonzero(y[2]) == 0 and torch.count_nonzero(y[0, :8]) > 0
