"""The runner, fused LoRA and sampler on every compute device this machine has (tests/devices.py):
the CPU here, and CUDA where scripts/gpu_smoke.sh runs them. Parity with transformers in fp32
(and bf16 on CUDA), per-row LoRA against peft, and penalties, bias, masks and logprobs on the
device giving the CPU's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genserve.engine.types import ChunkInput, Request, SamplingParams, StepInput
from genserve.model import hardware
from genserve.model.runner import LlamaRunner
from genserve.model.sampler import SamplingRow, sample
from genserve.model.worker import request_state
from tests.devices import COMPUTE
from tests.unit.test_lora import base, make_adapter
from tests.unit.test_runner import llama, qwen2

CASES = [(d, torch.float32) for d in COMPUTE] + [(d, torch.bfloat16) for d in COMPUTE if d != "cpu"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2}  # bf16 rounds each layer's sums


def chunk(rid: str, slot: int, ids: list[int], start: int, adapter: str | None = None,
          params: SamplingParams = SamplingParams()) -> ChunkInput:  # fmt: skip
    return ChunkInput(rid, slot, tuple(ids), start, True, params, 0, adapter)


def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        dev = next(model.parameters()).device
        return model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1].float()


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("make", [llama, qwen2])
@pytest.mark.parametrize("invariant", [True, False])
def test_runner_matches_transformers(make, device: str, dtype: torch.dtype, invariant) -> None:
    model = make().to(device=device, dtype=dtype)
    runner = LlamaRunner(model, 4, 128, batch_invariant=invariant)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 300, (40,), generator=g).tolist()
    b = torch.randint(0, 300, (9,), generator=g).tolist()
    out = runner.execute(StepInput((chunk("a", 3, a, 0), chunk("b", 1, b, 0))))
    assert out.device.type == device
    close(out[0], last_logits(model, a), dtype)
    close(out[1], last_logits(model, b), dtype)
    out = runner.execute(StepInput((chunk("a", 3, [11], 40), chunk("b", 1, [13], 9))))
    close(out[0], last_logits(model, a + [11]), dtype)
    close(out[1], last_logits(model, b + [13]), dtype)


@pytest.mark.parametrize("device", COMPUTE)
def test_a_row_gets_the_same_logits_alone_or_batched(device: str) -> None:
    """Rule 4's premise, with the kernels measured on this device as the server measures them.
    On the CPU it holds by design (oneDNN, a lone row padded to two). On CUDA cuBLAS picks
    kernels by row count: the measurement then runs invariant calls in calls of a fixed row
    count (hardware.fixed_rows_for; issue 20 item 2), and attention is per row by design
    (model/flex.py). Not yet run on a GPU: scripts/gpu_smoke.sh reports it."""
    model = llama().to(device)
    specs = hardware.model_specs(model.config, 64, 8)
    policy = hardware.measure_policy(specs, torch.float32, "none", torch.device(device), 64, 8)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 300, (30,), generator=g).tolist()
    mates = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 17, 3)]
    alone = LlamaRunner(model, 8, 128, policy=policy).execute(StepInput((chunk("x", 0, x, 0),)))
    batched = LlamaRunner(model, 8, 128, policy=policy).execute(StepInput(
        tuple(chunk(f"m{i}", i + 1, m, 0) for i, m in enumerate(mates)) + (chunk("x", 0, x, 0),)
    ))  # fmt: skip
    assert torch.equal(alone[0], batched[-1])


@pytest.mark.parametrize("device", COMPUTE)
@pytest.mark.parametrize("invariant", [True, False])  # per-adapter passes, or fused
def test_adapters_per_row_match_peft(tmp_path: Path, device: str, invariant: bool) -> None:
    ref = make_adapter(tmp_path / "a", seed=1).to(device)
    plain = base().to(device)
    runner = LlamaRunner(plain, 4, 64, batch_invariant=invariant)
    runner.add_adapter("a", tmp_path / "a")
    x, y = [5, 6, 7, 8], [9, 10, 11]
    out = runner.execute(StepInput((chunk("x", 0, x, 0, "a"), chunk("y", 1, y, 0))))
    close(out[0], last_logits(ref, x), torch.float32)
    close(out[1], last_logits(plain, y), torch.float32)


ROWS = [
    SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, logprobs=2),
    SamplingParams(temperature=0.0, repetition_penalty=1.6),
    SamplingParams(temperature=0.0, logit_bias=((5, 100.0),), logprobs=0),
    SamplingParams(temperature=0.7, top_k=3, seed=11),
    SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, seed=12),
]


@pytest.mark.parametrize("device", COMPUTE)
def test_sampling_on_the_device_gives_the_cpus_tokens(device: str) -> None:
    """Greedy rows with penalties and bias, and seeded draws from peaked distributions: the
    same tokens on the device as on the CPU (the uniforms come from the same CPU generators)."""
    logits = torch.randn(len(ROWS), 300, generator=torch.Generator().manual_seed(5)) * 6

    def run(dev: str) -> list:
        rows = []
        for i, p in enumerate(ROWS):
            s = request_state(Request(f"r{i}", [1, 2, 3, 4], p), 300, torch.device(dev))
            if s.counts is not None:
                s.counts[[1, 2, 2]] += 1
            rows.append(SamplingRow(p, s.generator, suppress=(0,), counts=s.counts,
                                    seen=s.seen, bias=s.bias))  # fmt: skip
        return sample(logits.to(dev), rows)

    here, there = run("cpu"), run(device)
    assert here.tokens == there.tokens and not there.errors
    assert there.tokens[2] == 5  # the +100 bias forces its token
    for a, b in zip(here.logprobs, there.logprobs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
