"""execute(step) -> logits for the tokens that sample.

Two runners share one interface:
- `LlamaRunner`, the fast path for Llama-family models (Llama, Mistral without sliding window,
  Qwen2, SmolLM). Its KV cache is preallocated as static slots, written in place, and never
  copied: a step's tokens from all sequences are flattened into one [T, hidden] matrix for the
  projections (where the FLOPs are), and attention reads each slot's cache through views.
- `HFRunner`, for any other causal LM: transformers' own forward, one sequence at a time, each
  slot with its own DynamicCache. Correct everywhere, slower.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from genserve.engine.types import StepInput

log = logging.getLogger(__name__)

FAST_PATH_TYPES = ("llama", "mistral", "qwen2")


class Runner(Protocol):
    num_slots: int
    max_len: int

    def execute(self, step: StepInput) -> torch.Tensor: ...

    def release(self, slot: int) -> None: ...


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * elem


def fast_path_supported(config: Any, max_len: int) -> bool:
    if config.model_type not in FAST_PATH_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_len:
        return False
    return getattr(config, "hidden_act", "silu") == "silu"


def make_runner(model: Any, num_slots: int, max_len: int, fast_path: bool = True) -> Runner:
    if fast_path and fast_path_supported(model.config, max_len):
        return LlamaRunner(model, num_slots, max_len)
    log.info("model type %s: using the generic transformers runner", model.config.model_type)
    return HFRunner(model, num_slots, max_len)


class Linear:
    """y = x W^T + b. On CPU the weight is prepacked for oneDNN, whose fp32 kernels run
    2-2.5x faster than the default BLAS at the row counts of a decode step (measured on this
    project's 2-core AVX-512 machine). Elsewhere, plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.packed: torch.Tensor | None = None
        if _onednn_ok(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=batch_hint)
            self.weight = None  # the packed copy is the one we use; do not hold two

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_ok(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # q, k and v projections stacked: one matmul instead of three
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # gate and up projections stacked
    down: Linear


def _stack_layer(layer: Any, batch_hint: int) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv_bias = None
    if any(p.bias is not None for p in projs):
        qkv_bias = torch.cat(
            [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs]
        )
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv=Linear(torch.cat([p.weight for p in projs]).contiguous(), qkv_bias, batch_hint),
        o=Linear(attn.o_proj.weight, attn.o_proj.bias, batch_hint),
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=Linear(gate_up, None, batch_hint),
        down=Linear(mlp.down_proj.weight, mlp.down_proj.bias, batch_hint),
    )


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """Per-step attention metadata, built once and shared by every layer."""

    write_slots: torch.Tensor  # [T] slot of each token
    write_pos: torch.Tensor  # [T] position of each token
    decode_rows: torch.Tensor  # rows of the flat batch that are single-token decodes
    decode_slots: torch.Tensor  # their slots
    decode_span: int  # attention reads slots [0, decode_span) ...
    decode_len: int  # ... and positions [0, decode_len)
    decode_mask: torch.Tensor | None  # [decode_span, 1, 1, decode_len]
    prefills: tuple[tuple[int, int, int, int], ...]  # (row0, n, slot, start) per chunk


class LlamaRunner:
    def __init__(self, model: Any, num_slots: int, max_len: int) -> None:
        cfg = model.config
        self.num_slots, self.max_len = num_slots, max_len
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.device, self.dtype = model.device, model.dtype
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.rotary = inner.rotary_emb  # transformers' own RoPE, so every rope_scaling works
        with torch.no_grad():
            self.lm_head = Linear(model.lm_head.weight, None, num_slots)
            self.layers = [_stack_layer(layer, num_slots) for layer in inner.layers]
        shape = (len(self.layers), num_slots, self.num_kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def release(self, slot: int) -> None:
        """Nothing to free: the next sequence in this slot overwrites what it reads."""

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        tokens, positions, sample_rows = self._flatten(step)
        plan = self._plan(step, positions)
        x = self.embed[tokens]
        cos, sin = self.rotary(x[None], positions[None])
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos[0], sin[0], plan)
        x = self._norm(x[sample_rows], self.final_norm)
        return self.lm_head(x).float()

    def _flatten(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for c in step.chunks:
            tokens.extend(c.token_ids)
            positions.extend(range(c.start, c.start + len(c.token_ids)))
            if c.sample:
                sample_rows.append(len(tokens) - 1)
        dev = self.device
        return (
            torch.tensor(tokens, device=dev),
            torch.tensor(positions, device=dev),
            torch.tensor(sample_rows, device=dev, dtype=torch.long),
        )

    def _plan(self, step: StepInput, positions: torch.Tensor) -> AttentionPlan:
        slots, rows, dslots, dpos, prefills = [], [], [], [], []
        row = 0
        for c in step.chunks:
            n = len(c.token_ids)
            slots.extend([c.slot] * n)
            if n == 1 and c.start > 0:
                rows.append(row)
                dslots.append(c.slot)
                dpos.append(c.start)
            else:
                prefills.append((row, n, c.slot, c.start))
            row += n
        dev = self.device
        span = max(dslots) + 1 if dslots else 0
        length = max(dpos) + 1 if dpos else 0
        mask = None
        if dslots:
            # Slots in [0, span) that do not decode this step see only position 0: harmless,
            # their rows are dropped, and no row is fully masked (that would give NaN).
            limit = torch.zeros(span, dtype=torch.long, device=dev)
            limit[torch.tensor(dslots, device=dev)] = torch.tensor(dpos, device=dev)
            mask = torch.arange(length, device=dev)[None, :] <= limit[:, None]
            mask = mask[:, None, None, :]
        return AttentionPlan(
            write_slots=torch.tensor(slots, device=dev),
            write_pos=positions,
            decode_rows=torch.tensor(rows, device=dev, dtype=torch.long),
            decode_slots=torch.tensor(dslots, device=dev, dtype=torch.long),
            decode_span=span,
            decode_len=length,
            decode_mask=mask,
            prefills=tuple(prefills),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def _layer(self, i: int, w: LayerWeights, x: torch.Tensor, cos, sin, plan) -> torch.Tensor:
        h = self._norm(x, w.input_norm)
        qkv = w.qkv(h)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = _rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.k_cache[i, plan.write_slots, :, plan.write_pos] = k
        self.v_cache[i, plan.write_slots, :, plan.write_pos] = v
        attn = self._attention(i, q, plan)
        x = x + w.o(attn.reshape(-1, q_size))
        h = self._norm(x, w.post_norm)
        gate, up = w.gate_up(h).chunk(2, dim=-1)
        return x + w.down(F.silu(gate) * up)

    def _attention(self, i: int, q: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        out = torch.empty_like(q)
        if plan.decode_span:
            span, length = plan.decode_span, plan.decode_len
            qd = q.new_zeros(span, self.num_heads, 1, self.head_dim)
            qd[plan.decode_slots] = q[plan.decode_rows][:, :, None, :]
            o = F.scaled_dot_product_attention(
                qd,
                self.k_cache[i, :span, :, :length],
                self.v_cache[i, :span, :, :length],
                attn_mask=plan.decode_mask,
                enable_gqa=True,
            )
            out[plan.decode_rows] = o[plan.decode_slots, :, 0, :]
        for row0, n, slot, start in plan.prefills:
            qp = q[row0 : row0 + n].transpose(0, 1)[None]
            k = self.k_cache[i, slot : slot + 1, :, : start + n]
            v = self.v_cache[i, slot : slot + 1, :, : start + n]
            mask = None
            if start:  # a later chunk also sees the whole cached prefix
                mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
            o = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask, is_causal=not start, enable_gqa=True
            )
            out[row0 : row0 + n] = o[0].transpose(0, 1)
        return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout; x is [T, heads, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class HFRunner:
    """Any causal LM, through transformers' forward, one sequence at a time."""

    def __init__(self, model: Any, num_slots: int, max_len: int) -> None:
        self.model = model
        self.num_slots, self.max_len = num_slots, max_len
        self.caches: dict[int, Any] = {}
        # transformers 5 renamed `past_key_values` to `cache`; remote-code models may not have.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        from transformers import DynamicCache

        rows = []
        for c in step.chunks:
            if c.start == 0:
                self.caches[c.slot] = DynamicCache(config=self.model.config)
            ids = torch.tensor([c.token_ids], device=self.model.device)
            kwargs = {self.cache_kw: self.caches[c.slot]}
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
            if c.sample:
                rows.append(out.logits[0, -1].float())
        return torch.stack(rows) if rows else torch.empty(0)
