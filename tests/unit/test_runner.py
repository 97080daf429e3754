"""The fast-path runner's logits match transformers' own forward."""

from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import hardware
from genserve.model.runner import HFRunner, LlamaRunner
from tests.tiny_model import SMALL_LLAMA

P = SamplingParams()
SMALL = SMALL_LLAMA


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()  # q/k/v projections have biases


def llama3_rope():
    torch.manual_seed(0)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    return LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=scaling)).eval()


def reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def chunk(rid: str, slot: int, ids: list[int], start: int, sample: bool = True) -> ChunkInput:
    return ChunkInput(rid, slot, tuple(ids), start, sample, P, 0)


@pytest.mark.parametrize("make", [llama, qwen2, llama3_rope])
@pytest.mark.parametrize(
    "runner_cls", [LlamaRunner, partial(LlamaRunner, batch_invariant=False), HFRunner]
)
def test_mixed_prefill_chunks_and_decodes_match_transformers(make, runner_cls) -> None:
    model = make()
    runner = runner_cls(model, 4, 128)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 300, (40,), generator=g).tolist()
    b = torch.randint(0, 300, (9,), generator=g).tolist()
    # step 1: first chunk of a (no sample) and all of b, in different slots
    out = runner.execute(StepInput((chunk("a", 3, a[:25], 0, False), chunk("b", 1, b, 0))))
    torch.testing.assert_close(out[0], reference(model, b), atol=1e-4, rtol=1e-4)
    # step 2: b decodes while a finishes its prompt
    out = runner.execute(StepInput((chunk("b", 1, [7], 9), chunk("a", 3, a[25:], 25))))
    torch.testing.assert_close(out[0], reference(model, b + [7]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], reference(model, a), atol=1e-4, rtol=1e-4)
    # step 3: both decode
    out = runner.execute(StepInput((chunk("a", 3, [11], 40), chunk("b", 1, [13], 10))))
    torch.testing.assert_close(out[0], reference(model, a + [11]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], reference(model, b + [7, 13]), atol=1e-4, rtol=1e-4)


def test_reused_slot_does_not_see_the_previous_sequence() -> None:
    model = llama()
    runner = LlamaRunner(model, 2, 64)
    runner.execute(StepInput((chunk("old", 0, list(range(30)), 0),)))
    runner.release(0)
    out = runner.execute(StepInput((chunk("new", 0, [5, 6, 7], 0),)))
    torch.testing.assert_close(out[0], reference(model, [5, 6, 7]), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def wide_llama():
    torch.manual_seed(0)
    cfg = dict(SMALL, hidden_size=256, intermediate_size=1536, num_attention_heads=8)
    cfg["max_position_embeddings"] = 512
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def wide_policy(wide_llama):
    """The kernels the server would run for it here, measured as at its start-up (rows up to
    a 512-token prompt, 8 sampled). Measured rather than assumed: on a 16-core Xeon with
    torch 2.11's oneDNN, the prepacked fp32 kernel the runner defaults to gave a row other
    bits in a batch, and the measurement picked another (H200 host, 2026-12-04)."""
    specs = hardware.model_specs(wide_llama.config, 512, 8)
    return hardware.measure_policy(specs, torch.float32, "none", torch.device("cpu"), 512, 8)


# (x's prompt, its batch mates' lengths): short rows (under one vector of 16 floats) alone and
# padded in a batch, mates longer and shorter, a mate far longer than x.
INVARIANCE_CASES = [
    (37, [50, 3, 90, 11]),
    (3, [40, 2, 17, 5]),
    (9, [300, 1, 15, 16]),
    (200, [7, 450, 64, 199]),
]


SEEDED = SamplingParams(seed=7)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "seeded"])
@pytest.mark.parametrize(("x_len", "mates"), INVARIANCE_CASES)
def test_a_sequence_gets_bitwise_identical_logits_alone_or_batched(
    wide_llama, wide_policy, x_len: int, mates: list[int], deterministic: bool
) -> None:
    """Batch invariance: what others share the step with, and which slot, changes nothing.
    Without --deterministic, it holds for a seeded sequence among unseeded ones. With the
    kernels measured on this CPU, as the server runs."""
    model = wide_llama
    g = torch.Generator().manual_seed(2 + x_len)
    x = torch.randint(0, 300, (x_len,), generator=g).tolist()
    steps = [[int(t)] for t in torch.randint(0, 300, (6,), generator=g)]

    def xchunk(slot: int, ids: list[int], start: int) -> ChunkInput:
        return ChunkInput("x", slot, tuple(ids), start, True, SEEDED, 0)

    alone = LlamaRunner(model, 8, 512, batch_invariant=deterministic, policy=wide_policy)
    want = [alone.execute(StepInput((xchunk(0, x, 0),)))[0]]
    pos = len(x)
    for s in steps:
        want.append(alone.execute(StepInput((xchunk(0, s, pos),)))[0])
        pos += 1

    batched = LlamaRunner(model, 8, 512, batch_invariant=deterministic, policy=wide_policy)
    others = {
        slot: torch.randint(0, 300, (n,), generator=g).tolist()
        for slot, n in zip((0, 1, 2, 4), mates, strict=True)
    }
    first = [chunk(str(s), s, ids, 0) for s, ids in others.items()]
    got = [batched.execute(StepInput((*first[:2], xchunk(5, x, 0), *first[2:])))[2]]
    lengths = {s: len(ids) for s, ids in others.items()}
    pos = len(x)
    for s in steps:
        mates = [chunk(str(k), k, [1], n) for k, n in lengths.items()]
        got.append(batched.execute(StepInput((*mates[:3], xchunk(5, s, pos), *mates[3:])))[3])
        lengths = {k: n + 1 for k, n in lengths.items()}
        pos += 1
    assert [torch.equal(w, o) for w, o in zip(want, got, strict=True)] == [True] * len(want)
