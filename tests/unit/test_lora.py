"""Per-row LoRA in the fast path matches peft's own forward, beside base-model rows."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import native
from genserve.model.lora import AdapterError
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA
from tests.unit.test_hardware import fixed_policy
from tests.unit.test_native import CountingPath

SMALL = SMALL_LLAMA
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(**config) -> LlamaForCausalLM:  # noqa: ANN003
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **config})).eval()


def make_adapter(folder: Path, seed: int, modules=MODULES, **config) -> torch.nn.Module:  # noqa: ANN003
    """A peft LoRA with random (non-zero) B, saved in peft's format; returns the peft model."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0)
    peft_model = get_peft_model(base(**config), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return peft_model.eval()


def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def chunk(rid, slot, ids, start, adapter=None) -> ChunkInput:
    return ChunkInput(rid, slot, tuple(ids), start, True, SamplingParams(), 0, adapter)


@pytest.mark.parametrize("deterministic", [True, False])  # per-adapter passes, or fused
@pytest.mark.parametrize("attention", ["sdpa", "flex"])  # the CPU's path, and accelerators'
@pytest.mark.parametrize("kernels", [None, "linear"])  # with a policy: decode.c's glue too
def test_rows_with_different_adapters_in_one_step_match_peft(
    tmp_path: Path, deterministic: bool, attention: str, kernels: str | None
) -> None:
    ref_a = make_adapter(tmp_path / "a", seed=1)
    ref_b = make_adapter(tmp_path / "b", seed=2, modules=["q_proj", "v_proj"])
    plain = base()
    policy = fixed_policy(plain, torch.float32, "none", kernels) if kernels else None
    runner = LlamaRunner(
        plain, 4, 64, batch_invariant=deterministic, attention=attention, policy=policy
    )
    glued = policy is not None and attention == "sdpa" and not deterministic
    assert (runner.native_glue is not None) == (glued and native.library() is not None)
    runner.add_adapter("a", tmp_path / "a")
    runner.add_adapter("b", tmp_path / "b")
    x, y, z = [5, 6, 7, 8], [9, 10, 11], [12, 13]
    step = StepInput((chunk("x", 0, x, 0, "a"), chunk("y", 1, y, 0), chunk("z", 2, z, 0, "b")))
    out = runner.execute(step)
    torch.testing.assert_close(out[0], last_logits(ref_a, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], last_logits(plain, y), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2], last_logits(ref_b, z), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[0], last_logits(plain, x), atol=1e-3)  # the adapter matters
    # decode step: the adapter keeps applying to its rows
    out = runner.execute(StepInput((chunk("x", 0, [3], 4, "a"), chunk("y", 1, [4], 3))))
    torch.testing.assert_close(out[0], last_logits(ref_a, x + [3]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], last_logits(plain, y + [4]), atol=1e-4, rtol=1e-4)


def prefill(runners, prompts: dict[int, tuple[list[int], str | None]]) -> None:  # noqa: ANN001
    for runner in runners:
        for slot, (ids, adapter) in prompts.items():
            runner.execute(StepInput((chunk(f"p{slot}", slot, ids, 0, adapter),)))


@pytest.mark.parametrize("path", ["stack", "glue"])
def test_decodes_under_adapters_through_decode_c_match_peft(tmp_path: Path, path: str) -> None:
    """Free decodes of adapters' requests take decode.c's paths too (the stack adds each
    row's own adapter's LoRA in C; the glue after torch's linears), beside a base row, alone,
    and after the loaded set changed (an adapter removed, another loaded: the indices move):
    the logits are peft's."""
    refs = {"a": make_adapter(tmp_path / "a", 1), "b": make_adapter(tmp_path / "b", 2, ["v_proj"])}
    refs["c"] = make_adapter(tmp_path / "c", 3, ["o_proj", "down_proj", "up_proj"])
    plain = base()
    policy = fixed_policy(plain, torch.float32, "none", "gemv")
    runner = LlamaRunner(plain, 4, 64, batch_invariant=False, policy=policy)
    assert runner.native_stack is not None and runner.native_glue is not None
    for name in ("a", "b"):
        runner.add_adapter(name, tmp_path / name)
    counting = CountingPath(getattr(runner, f"_through_{path}"))
    runner.native_decode = dict.fromkeys((0, 1, 2), counting)
    ids = {0: [5, 6, 7, 8], 1: [9, 10, 11], 2: [12, 13]}
    owner = {0: "a", 1: None, 2: "b"}
    prefill([runner], {s: (ids[s], owner[s]) for s in ids})
    for slots in ((0, 1, 2), (0,), (2, 1)):
        if slots == (2, 1):  # b out, c in: "a" stays first, "c" takes b's slot's rows
            runner.remove_adapter("b")
            runner.add_adapter("c", tmp_path / "c")
            owner[2] = "c"
            prefill([runner], {2: (ids[2], "c")})
        step = StepInput(tuple(chunk(f"d{s}", s, [3 + s], len(ids[s]), owner[s]) for s in slots))
        out = runner.execute(step)
        for row, s in enumerate(slots):
            ids[s].append(3 + s)
            ref = refs[owner[s]] if owner[s] else plain
            torch.testing.assert_close(out[row], last_logits(ref, ids[s]), atol=1e-4, rtol=1e-4)
    assert counting.rows == [3, 1, 2]
    assert not torch.allclose(out[0], last_logits(plain, ids[2]), atol=1e-3)  # c mattered


def test_many_adapter_rows_in_the_stack_match_peft_whatever_the_threads(tmp_path: Path) -> None:
    """24 decodes a step, under two adapters and none: enough multiply-adds that decode.c
    splits the adapters' products over the threads (by rows, then by blocks of columns);
    each row's logits are still peft's."""
    shape = {"hidden_size": 128, "intermediate_size": 512}
    refs = {
        "a": make_adapter(tmp_path / "a", 1, **shape),
        "b": make_adapter(tmp_path / "b", 2, **shape),
    }
    plain = base(**shape)
    policy = fixed_policy(plain, torch.float32, "none", "gemv")
    runner = LlamaRunner(plain, 24, 32, batch_invariant=False, policy=policy)
    for name in refs:
        runner.add_adapter(name, tmp_path / name)
    counting = CountingPath(runner._through_stack)
    runner.native_decode = dict.fromkeys((0, 1, 2), counting)
    owner = {s: ("a", "b", None)[s % 3] for s in range(24)}
    ids = {s: [5 + s, 6, 7 + s % 5] for s in range(24)}
    prefill([runner], {s: (ids[s], owner[s]) for s in ids})
    step = StepInput(tuple(chunk(f"d{s}", s, [9], 3, owner[s]) for s in range(24)))
    out = runner.execute(step)
    for s in range(24):
        ref = refs[owner[s]] if owner[s] else plain
        torch.testing.assert_close(out[s], last_logits(ref, [*ids[s], 9]), atol=1e-4, rtol=1e-4)
    assert counting.rows == [24]


@pytest.mark.skipif(not native.amx_ready(), reason="no AMX tiles on this CPU")
def test_adapter_rows_in_the_stack_on_amx_tiles_stay_close_to_the_eager_path(
    tmp_path: Path,
) -> None:
    """bf16 on amx.c's tiles (gate/up's SiLU fused in the tiles' epilogue where no adapter
    adds to it): rows of an adapter on gate/up leave that epilogue; the stack's logits stay
    close to the eager path's, which adds the LoRA after each torch linear."""
    shape = {"hidden_size": 128, "intermediate_size": 256}
    make_adapter(tmp_path / "a", 1, **shape)
    plain = base(**shape).to(torch.bfloat16)
    gemv = fixed_policy(plain, torch.bfloat16, "none", "gemv")
    plans = tuple(  # the 300-token LM head is not whole tiles: gemv
        replace(p, choices=("amx",) * 4, invariant="amx") if p.out_features % 16 == 0 else p
        for p in gemv.plans
    )
    policy = replace(gemv, plans=plans)
    fast, eager = (LlamaRunner(plain, 4, 64, batch_invariant=False, policy=policy) for _ in "12")
    assert fast.native_stack is not None and fast.layers[0].gate_up.tiles[0].glu
    for runner in (fast, eager):
        runner.add_adapter("a", tmp_path / "a")
    counting = CountingPath(fast._through_stack)
    fast.native_decode, eager.native_decode = dict.fromkeys((0, 1, 2), counting), {}
    ids = {0: [5, 6, 7, 8], 1: [9, 10, 11]}
    prefill([fast, eager], {0: (ids[0], "a"), 1: (ids[1], None)})
    for slots in ((0, 1), (0,)):
        step = StepInput(tuple(chunk(f"d{s}", s, [3], len(ids[s]), "a" if s == 0 else None)
                               for s in slots))  # fmt: skip
        torch.testing.assert_close(fast.execute(step), eager.execute(step), atol=0.05, rtol=0.05)
        for s in slots:
            ids[s].append(3)
    assert counting.rows == [2, 1]


def test_adapter_for_another_shape_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", seed=1)
    bigger = LlamaForCausalLM(LlamaConfig(**{**SMALL, "hidden_size": 128})).eval()
    with pytest.raises(AdapterError, match="shapes"):
        LlamaRunner(bigger, 2, 32).add_adapter("a", tmp_path / "a")


def test_pickle_only_adapter_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", seed=1)
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors"):
        LlamaRunner(base(), 2, 32).add_adapter("a", tmp_path / "a")
