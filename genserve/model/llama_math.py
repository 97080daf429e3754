"""The Llama-family layer's math that both of LlamaRunner's paths use: its weights stacked
(q/k/v as one matrix, gate/up as one), RMSNorm and rotary embedding. The eager runner
(runner.py) and the compiled lone decode (compiled.py) take them from here, so the two
compute the same function by construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


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
    """transformers' LlamaRMSNorm: normalised in float32, the weight applied after rounding
    back. torch's rms_norm computes in float32 for a narrower input and rounds once, so it
    gives the same bits (tests/unit/test_llama_math.py); on CPU it is still those steps, but
    composed in C++: one Python-level call instead of seven, where at one row each call is
    microseconds of dispatch, two norms a layer."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class Rotation(NamedTuple):
    """A step's rotary tables, shaped once for every layer: cos as transformers gives it,
    and sin with rotate-half's sign folded in ([-sin_lo, sin_hi]), both [T, 1, head_dim].
    (A NamedTuple: the compiled decode builds one inside its graph, which dynamo traces.)"""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotation:
        """From transformers' rotary embedding output for one sequence of rows: [T, head_dim]."""
        half = cos.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cls(cos[:, None, :], signed[:, None, :])


def rope(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout; x is [T, heads, head_dim] (any
    strides). transformers' x*cos + cat(-x_hi, x_lo)*sin is x*cos + roll(x)*[-sin_lo, sin_hi]:
    the same products and sum in the same dtype, bit for bit, in four ops instead of nine."""
    return x * rot.cos + x.roll(x.shape[-1] // 2, -1) * rot.sin
