"""--compile-decode (model/compiled.py): a lone free decode runs one compiled graph over the
runner's own KV cache and gives transformers' logits; everything else keeps the eager path."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA

FREE = SamplingParams()
SEEDED = SamplingParams(seed=7)


def reference(m: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1]


def test_a_lone_decode_runs_compiled_and_matches_transformers() -> None:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()
    runner = LlamaRunner(m, 4, 64, batch_invariant=False, compile_decode=True)
    assert runner.lone is not None
    calls = []
    compiled = runner.lone
    runner.lone = lambda *a: calls.append(a[-1]) or compiled(*a)  # counts compiled steps
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    slot = 2  # not lane 0 or 1, where compiling wrote its warm-up rows
    runner.execute(StepInput((ChunkInput("a", slot, tuple(ids[:6]), 0, True, FREE, 0),)))
    for start in range(6, 9):
        step = StepInput((ChunkInput("a", slot, (ids[start],), start, True, FREE, 0),))
        out = runner.execute(step)
        torch.testing.assert_close(out[0], reference(m, ids[: start + 1]), atol=1e-4, rtol=1e-4)
    assert calls == [7, 8, 9]  # every decode compiled, attending its whole prefix
    # A seeded row computes as it would batched: the eager path, and the same cache.
    step = StepInput((ChunkInput("a", slot, (5,), 9, True, SEEDED, 0),))
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, [*ids, 5]), atol=1e-4, rtol=1e-4)
    assert calls == [7, 8, 9]
