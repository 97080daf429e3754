"""The layer math both runner paths share computes transformers' functions bit for bit, in
fewer ops: RMSNorm through torch's fused rms_norm, rotary embedding as a roll against a
signed sine, q and k rotated as one strided view of the stacked qkv projection."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from genserve.model.llama_math import Rotation, rms_norm, rope

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gives_transformers_bits(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96) + 0.5
    norm = norm.to(dtype)
    # rows from 1e-4 to 1e4 in scale, where a float32 sum's rounding shows
    x = (torch.randn(200, 96) * torch.logspace(-4, 4, 200)[:, None]).to(dtype)
    ours = rms_norm(x, norm.weight, 1e-5)
    assert ours.dtype == dtype
    assert torch.equal(ours, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_q_and_k_as_one_strided_view_gives_transformers_bits(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, rows = 6, 2, 32, 50
    cfg = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=2)
    rotary = LlamaRotaryEmbedding(cfg)
    positions = torch.randint(0, 4000, (1, rows))
    # the runner's layout: [T, q | k | v], q and k rotated through one view of it
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim).to(dtype)
    cos, sin = rotary(qkv[None], positions)
    qk_view = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
    assert not qk_view.is_contiguous()
    ours = rope(qk_view, Rotation.of(cos[0], sin[0]))

    q = qk_view[:, :heads].transpose(0, 1)[None]  # transformers' [1, heads, T, D]
    k = qk_view[:, heads:].transpose(0, 1)[None]
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(ours[:, :heads], want_q[0].transpose(0, 1))
    assert torch.equal(ours[:, heads:], want_k[0].transpose(0, 1))


def test_rotation_folds_the_rotate_half_sign_into_sin() -> None:
    cos = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sin = torch.tensor([[5.0, 6.0, 7.0, 8.0]])
    rot = Rotation.of(cos, sin)
    assert rot.cos.shape == rot.sin.shape == (1, 1, 4)
    assert rot.sin.flatten().tolist() == [-5.0, -6.0, 7.0, 8.0]
    x = torch.tensor([[[1.0, 10.0, 100.0, 1000.0]]])
    # x*cos + [-x_hi, x_lo]*sin
    want = [1 * 1 - 100 * 5, 10 * 2 - 1000 * 6, 100 * 3 + 1 * 7, 1000 * 4 + 10 * 8]
    assert rope(x, rot).flatten().tolist() == want
