"""The Llama-family layer's math that both of LlamaRunner's paths use: its weights stacked
(q/k/v as one matrix, gate/up as one), RMSNorm and rotary embedding. The eager runner
(runner.py) and the compiled lone decode (compiled.py) take them from here, so the two
compute the same function by construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class StackedLayer:
    """One decoder layer's weights as the runner computes with them (dense tensors)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    down: torch.Tensor
    down_bias: torch.Tensor | None


def stack_layer(layer: Any) -> StackedLayer:
    """From a transformers Llama/Mistral/Qwen2 decoder layer (a missing q/k/v bias: zeros)."""
    attn, mlp = layer.self_attn, layer.mlp
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv_bias = None
    if any(p.bias is not None for p in projs):
        qkv_bias = torch.cat(
            [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs]
        )
    return StackedLayer(
        input_norm=layer.input_layernorm.weight,
        qkv=torch.cat([p.weight for p in projs]).contiguous(),
        qkv_bias=qkv_bias,
        o=attn.o_proj.weight,
        o_bias=attn.o_proj.bias,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
        down=mlp.down_proj.weight,
        down_bias=mlp.down_proj.bias,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: in float32, the weight applied after rounding back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout; x is [T, heads, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
