"""Per-row LoRA in the fast path matches peft's own forward, beside base-model rows."""

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

SMALL = SMALL_LLAMA
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def make_adapter(folder: Path, seed: int, modules=MODULES) -> torch.nn.Module:
    """A peft LoRA with random (non-zero) B, saved in peft's format; returns the peft model."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0)
    peft_model = get_peft_model(base(), cfg)
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
