"""Batch invariance where no kernel keeps a row's result whatever its batch (cuBLAS picks its
kernel by row count; issue 20, item 2): invariant calls then run in calls of a fixed row
count, which the start-up measurement checks. Here a kernel that depends on its row count
stands in for such a library."""

import torch
import torch.nn.functional as F

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import hardware
from genserve.model.hardware import ShapePlan, fixed_rows_for, in_fixed_rows
from genserve.model.runner import Linear, LlamaRunner
from tests.unit.test_lora import base, make_adapter


def by_row_count(weight: torch.Tensor):  # noqa: ANN201 - a kernel
    """y = x W^T, plus a term that depends on how many rows share the call."""
    return lambda x: F.linear(x, weight) + 1e-3 * x.shape[0]


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 16, generator=g), torch.randn(70, 16, generator=g)


def test_in_fixed_rows_gives_a_row_the_same_result_alone_or_batched() -> None:
    w, x = rows()
    fn = by_row_count(w)
    alone = in_fixed_rows(fn, x[:1], 8)
    for m in (2, 7, 8, 9, 70):
        out = in_fixed_rows(fn, x[:m], 8)
        assert out.shape == (m, 24)
        assert torch.equal(out[:1], alone)
    torch.testing.assert_close(out, F.linear(x, w) + 8e-3)  # each row: a call of 8 rows
    assert not torch.equal(fn(x[:1]), fn(x[:2])[:1])  # the kernel alone is not invariant


def test_the_measurement_picks_fixed_rows_only_for_a_kernel_that_needs_them() -> None:
    w, x = rows()
    sizes = (3, 8, 17, 64)
    assert hardware.row_invariance(by_row_count(w), x, sizes) == (False, False)
    assert fixed_rows_for(by_row_count(w), x, sizes, hint=8) == 8
    assert fixed_rows_for(by_row_count(w), x, sizes, hint=1) == 2  # at least two rows

    def random_rows(x: torch.Tensor) -> torch.Tensor:  # no fixed row count helps this one
        return F.linear(x, w) + torch.rand(x.shape[0], 1)

    assert fixed_rows_for(random_rows, x, sizes, hint=8) == 0


def test_a_linear_with_fixed_rows_keeps_a_rows_bits_in_any_batch() -> None:
    w, x = rows()
    plan = ShapePlan(24, 16, ("linear",) * 4, "linear", False, fixed_rows=4)
    lin = Linear(w, None, 4, plan)
    lin.invariant = by_row_count(w)  # the library that depends on the row count
    alone = lin(x[:1], invariant=True)
    assert all(torch.equal(lin(x[:m], invariant=True)[:1], alone) for m in (2, 5, 33))
    free = lin.by_bucket[0]  # free rows take the bucket's kernel, unchanged
    assert torch.equal(lin(x[:3]), free(x[:3]))


def test_fixed_rows_survive_the_policy_cache_and_name_the_fingerprint() -> None:
    plan = ShapePlan(24, 16, ("linear",) * 4, "linear", False, fixed_rows=32)
    policy = hardware.KernelPolicy("bfloat16", "none", (plan,))
    back = hardware.KernelPolicy.from_json(policy.to_json())
    assert back.plans[0].fixed_rows == 32 and "(rows of 32)" in back.summary()
    plain = hardware.KernelPolicy(
        "bfloat16", "none", (ShapePlan(24, 16, ("linear",) * 4, "linear", False),)
    )
    assert policy.tag() != plain.tag()


def test_adapters_take_fixed_rows_where_the_base_weights_needed_them(tmp_path) -> None:  # noqa: ANN001
    """A seeded row with a LoRA adapter: the adapter's own products run in fixed-row calls
    too, and the logits still match peft."""
    ref = make_adapter(tmp_path / "a", seed=1)
    plain = base()
    specs = hardware.model_specs(plain.config, 64, 4)
    plans = tuple(
        ShapePlan(s.out_features, s.in_features, ("linear",) * 4, "linear", False, fixed_rows=4)
        for s in specs
    )
    policy = hardware.KernelPolicy("float32", "none", plans, "test")
    runner = LlamaRunner(plain, 4, 64, batch_invariant=True, policy=policy)
    runner.add_adapter("a", tmp_path / "a")
    stack = runner.lora.adapters["a"].layers[0]["qkv"]
    assert stack.a.plan.fixed_rows == 4 and stack.b.plan.fixed_rows == 4
    ids = [5, 6, 7, 8, 9]
    step = StepInput((ChunkInput("x", 0, tuple(ids), 0, True, SamplingParams(), 0, "a"),))
    out = runner.execute(step)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(out[0], want, atol=1e-4, rtol=1e-4)
