"""A lone decode (one sequence, one new token) as one compiled graph: `--compile-decode`.

Eager, a one-stream step is the weights' reads plus ~25 small ops per layer at a few
microseconds each. Under `torch.compile` with the weights frozen as constants, inductor
prepacks them for oneDNN and fuses everything between the linears: `bench/compiled_decode.py`
measured 18.3 ms a step against 29.4 ms for this module eager (bf16, SmolLM2-135M shape,
2-core Xeon with AMX). Its math is llama_math's, as the eager runner's is. The module reads
and writes the runner's own KV cache tensors, one per layer (held as buffers: written through
views of one tensor, the graph copied the whole cache per layer), at the sequence's run of
blocks.

Only free rows take it (a seeded or --deterministic row must compute as it would batched), on
the CPU, without adapters or int8 weights; everything else runs the runner's eager path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genserve.model.llama_math import StackedLayer, rms_norm, rope, stack_layer

log = logging.getLogger(__name__)


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


class _Layer(nn.Module):
    """One decoder layer's stacked weights (llama_math.StackedLayer) as frozen parameters."""

    def __init__(self, w: StackedLayer) -> None:
        super().__init__()
        for name in StackedLayer.__slots__:
            setattr(self, name, _frozen(getattr(w, name)))


class LoneDecode(nn.Module):
    """forward(token [1], write [1], cos, sin, run, length) -> logits [1, vocab] float32: the
    token at cache row `write` (of each layer's [kv, positions, dim] cache), attending rows
    run..run+length-1."""

    def __init__(self, model: Any, k_cache: list, v_cache: list, eps: float) -> None:
        super().__init__()
        cfg, inner = model.config, model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = eps
        self.embed = _frozen(inner.embed_tokens.weight)
        self.final_norm = _frozen(inner.norm.weight)
        self.lm_head = _frozen(model.lm_head.weight)
        self.layers = nn.ModuleList(_Layer(stack_layer(layer)) for layer in inner.layers)
        for i, (k, v) in enumerate(zip(k_cache, v_cache, strict=True)):
            self.register_buffer(f"k{i}", k, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)

    def forward(
        self, token: torch.Tensor, write: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        run: int, length: int,
    ) -> torch.Tensor:  # fmt: skip
        x = self.embed[token]
        for i, layer in enumerate(self.layers):
            keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            x = self._layer(layer, x, keys, values, write, cos, sin, run, length)
        return F.linear(rms_norm(x, self.final_norm, self.eps), self.lm_head).float()

    def _layer(self, w: _Layer, x, keys, values, write, cos, sin, run: int, length: int):  # noqa: ANN001, ANN202
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = F.linear(rms_norm(x, w.input_norm, self.eps), w.qkv, w.qkv_bias)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = rope(q.view(1, self.heads, self.head_dim), cos, sin)
        k = rope(k.view(1, self.kv_heads, self.head_dim), cos, sin)
        keys.index_copy_(1, write, k.transpose(0, 1))
        values.index_copy_(1, write, v.view(1, self.kv_heads, self.head_dim).transpose(0, 1))
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None, :, run : run + length],
            values[None, :, run : run + length],
            enable_gqa=True,
        )
        x = x + F.linear(attn[0].transpose(0, 1).reshape(1, q_size), w.o, w.o_bias)
        gate, up = F.linear(rms_norm(x, w.post_norm, self.eps), w.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.down, w.down_bias)


def compile_lone_decode(module: LoneDecode, lane: int, rotary: Any) -> Any:
    """The compiled module, already run (compiled) for any run and length: two calls at two
    different runs and lengths make both dynamic, so no later step recompiles. The calls
    write rows of the first two lanes' first positions, which their next owners overwrite."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # the weights as constants: prepacked for oneDNN, folded
    compiled = torch.compile(module)
    started = time.perf_counter()
    token = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        for run, length in ((0, 1), (lane, 2)):
            pos = torch.tensor([length - 1])
            cos, sin = rotary(module.embed[token][None], pos[None])
            compiled(token, pos + run, cos[0], sin[0], run, length)
    log.info("compiled the lone decode step in %.1f s", time.perf_counter() - started)
    return compiled
