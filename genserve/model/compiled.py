"""A lone decode (one sequence, one new token) as one compiled graph: `--compile-decode`.

Eager, a one-stream step is the weights' reads plus ~25 small ops per layer at a few
microseconds each. Under `torch.compile` with the weights frozen as constants, inductor
prepacks them for oneDNN and fuses everything between the linears: `bench/compiled_decode.py`
measured 18.3 ms a step against 29.4 ms for this module eager (bf16, SmolLM2-135M shape,
2-core Xeon with AMX). Its math is llama_math's, as the eager runner's is. The module reads
and writes the runner's own KV cache tensors, one per layer (held as buffers: written through
views of one tensor, the graph copied the whole cache per layer), at the sequence's run of
blocks.

Each one-row product runs as the library's linear (oneDNN/MKL, prepacked by freezing) or as a
multiply-and-sum that inductor fuses into one vectorised pass over the weight, whichever
`measure_gemv` timed faster here for that weight shape: on a 2-core AVX2 EPYC the fused pass
read fp32 weights at 11-16 GB/s against 6-12 for the libraries, and the whole step ran 40.0 ms
against 69.5 ms (bench/compiled_decode.py). Nothing is assumed: where the library's GEMV is
faster, it stays.

The runner compiles it on a thread of its own, serving eager meanwhile (runner._compile_lone).

With `--quantization int8` a weight whose one-row kernel the runner's policy measured as
torch's int8 one stays int8 in the graph (the others run dequantized, as in the runner). A
weight whose one-row kernel the policy measured as genserve's own (native.py, gemv.c) runs it in the
graph too, as a custom op (over the int8 weights where the runner quantizes).

Only free rows take it (a seeded or --deterministic row must compute as it would batched), on
the CPU, without adapters; everything else runs the runner's eager path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genserve.model import hardware, kernels, native
from genserve.model.llama_math import Rotation, StackedLayer, rms_norm, rope, stack_layer

log = logging.getLogger(__name__)


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def fused_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, in] times w [out, in] transposed, written as a multiply and a sum over `in`: under
    inductor, one loop over w's rows (a vectorised dot product each) with no library call."""
    return (x[:, None, :] * w).sum(-1)


# the library's linear, fused_gemv, torch's int8 kernel, genserve's own (native.py, a custom op)
FORMS = ("linear", "fused", "int8", "gemv")
LIBRARY = ("linear", "onednn")  # what F.linear in a frozen graph becomes (prepacked by inductor)


class _Weight(nn.Module):
    """One weight matrix (and bias) as the graph multiplies a row by it, in one of FORMS.
    `quantize`: the runner computes with int8 weights, so this one does too: as int8 (form
    "int8") or dequantized (the other forms), the same values as the runner's kernels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, form: str,
                 quantize: bool) -> None:  # fmt: skip
        super().__init__()
        self.form, self.bias = form, _frozen(bias)
        quant = kernels.quantize_int8(weight) if quantize else None
        self.q = self.scales = self.weight = None
        if form == "int8" and quant is not None:
            self.q, self.scales = _frozen(quant.q), _frozen(quant.scales.to(torch.bfloat16))
        elif form == "gemv" and quant is not None:  # reads the int8 weights, float32 scales
            self.q, self.scales = _frozen(quant.q), _frozen(quant.scales)
        elif form == "gemv":
            self.weight = _frozen(weight.contiguous())
        else:
            self.form = "linear" if form == "int8" else form  # int8 without quantizing: dense
            self.weight = _frozen(quant.dequantize(weight.dtype) if quant else weight)
        if self.form == "gemv":
            native.op()  # registered now: traced, the cached lookup broke the graph per weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.form is fixed while tracing: the graph holds one form per weight.
        if self.form == "int8":  # its kernel is vectorised for bf16 activations (kernels.py)
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales).to(x.dtype)
        elif self.form == "gemv":
            w = self.q if self.q is not None else self.weight
            y = torch.ops.genserve.gemv(x, w, self.scales)
        elif self.form == "fused":
            y = fused_gemv(x, self.weight)
        else:
            y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class _Layer(nn.Module):
    """One decoder layer's stacked weights (llama_math.StackedLayer) as frozen parameters."""

    def __init__(self, w: StackedLayer, forms: Mapping[tuple[int, int], str], quantize: bool):
        super().__init__()
        self.input_norm, self.post_norm = _frozen(w.input_norm), _frozen(w.post_norm)
        for name in ("qkv", "o", "gate_up", "down"):
            weight, bias = getattr(w, name), getattr(w, f"{name}_bias", None)
            form = forms.get(tuple(weight.shape), "linear")
            setattr(self, name, _Weight(weight, bias, form, quantize))


class LoneDecode(nn.Module):
    """forward(token [1], write [1], cos, sin, end, length) -> logits [1, vocab] float32: the
    token at cache row `write` (of each layer's [kv, positions, dim] cache), attending rows
    end-length..end-1. (The end, not the start: a decode's end and length are both at least
    2, where the compiler treats an int as a symbol; a start of 0 would be a graph of its
    own, compiled at the first decode in lane 0.) `forms`: each weight shape's form (FORMS;
    "linear" where absent); `quantize`: int8 weights, as the runner's."""

    def __init__(
        self, model: Any, k_cache: list, v_cache: list, eps: float,
        forms: Mapping[tuple[int, int], str] | None = None, quantize: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.forms = dict(forms or {})
        cfg, inner = model.config, model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = eps
        self.embed = _frozen(inner.embed_tokens.weight)
        self.final_norm = _frozen(inner.norm.weight)
        head = model.lm_head.weight
        self.lm_head = _Weight(head, None, self.forms.get(tuple(head.shape), "linear"), quantize)
        layers = (_Layer(stack_layer(layer), self.forms, quantize) for layer in inner.layers)
        self.layers = nn.ModuleList(layers)
        for i, (k, v) in enumerate(zip(k_cache, v_cache, strict=True)):
            self.register_buffer(f"k{i}", k, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)

    def forward(
        self, token: torch.Tensor, write: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        end: int, length: int,
    ) -> torch.Tensor:  # fmt: skip
        x = self.embed[token]
        for i, layer in enumerate(self.layers):
            keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            x = self._layer(layer, x, keys, values, write, cos, sin, end, length)
        return self.lm_head(rms_norm(x, self.final_norm, self.eps)).float()

    def _layer(self, w: _Layer, x, keys, values, write, cos, sin, end: int, length: int):  # noqa: ANN001, ANN202
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = w.qkv(rms_norm(x, w.input_norm, self.eps))
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        rot = Rotation.of(cos, sin)  # inductor fuses it with the products that read it
        q = rope(q.view(1, self.heads, self.head_dim), rot)
        k = rope(k.view(1, self.kv_heads, self.head_dim), rot)
        keys.index_copy_(1, write, k.transpose(0, 1))
        values.index_copy_(1, write, v.view(1, self.kv_heads, self.head_dim).transpose(0, 1))
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None, :, end - length : end],
            values[None, :, end - length : end],
            enable_gqa=True,
        )
        x = x + w.o(attn[0].transpose(0, 1).reshape(1, q_size))
        gate, up = w.gate_up(rms_norm(x, w.post_norm, self.eps)).chunk(2, dim=-1)
        return x + w.down(F.silu(gate) * up)


WARM_UP_ROWS = 5  # cache rows compile_lone_decode's call writes and reads, from its row0


def compile_lone_decode(module: LoneDecode, rotary: Any, row0: int) -> Any:
    """The compiled module, already run (so compiled) once for every later step: dynamic, so
    any end and length (both >= 2: the compiler specialises 0 and 1) reuse the one graph.
    The call writes cache row row0+4 and reads rows row0+2..row0+4: rows no sequence owns
    (the runner keeps them past its blocks), so it may run while requests do."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # the weights as constants: prepacked for oneDNN, folded
    compiled = torch.compile(module, dynamic=True)
    started = time.perf_counter()
    # Inputs made as execute makes them, under inference_mode: a tensor made outside it has
    # another dispatch key set, which the graph guards on (the first step would recompile).
    with torch.inference_mode():
        token, pos = torch.zeros(1, dtype=torch.long), torch.tensor([4])
        cos, sin = rotary(module.embed[token][None], pos[None])
        # end and length distinct (the compiler would guard their equality), not 0 or 1
        compiled(token, pos + row0, cos[0], sin[0], row0 + WARM_UP_ROWS, 3)
    log.info("compiled the lone decode step in %.1f s", time.perf_counter() - started)
    return compiled


@dataclass(frozen=True, slots=True)
class GemvTiming:
    """One weight shape at one row, weights cold: microseconds for the fused pass (the
    compiled call's fixed cost measured on a tiny shape and taken off) and for the faster
    library kernel (F.linear or oneDNN prepacked)."""

    out_features: int
    in_features: int
    fused_us: float
    library_us: float

    @property
    def fused_wins(self) -> bool:
        return self.fused_us < self.library_us


def measure_gemv(shapes: Sequence[tuple[int, int]], dtype: torch.dtype) -> list[GemvTiming]:
    """Times fused_gemv (compiled once, dynamic shapes) against the library's kernels on
    random weights of each shape, interleaved and cold as hardware.time_kernels does."""
    fused = torch.compile(fused_gemv, dynamic=True)
    with torch.inference_mode():
        # 16x8, not 8x8: equal sizes would be a graph of their own (duck sizing)
        fixed = _overhead(fused, torch.zeros(1, 8, dtype=dtype), torch.zeros(16, 8, dtype=dtype))
        return [_time_shape(fused, out, inp, dtype, fixed) for out, inp in dict.fromkeys(shapes)]


def _overhead(fused: Any, x: torch.Tensor, w: torch.Tensor) -> float:
    fns = {"fused": [partial(fused, w=w)]}
    fns["fused"][0](x)  # compiles
    return hardware.time_kernels(fns, [x], torch.device("cpu"))["fused"][0]


def _time_shape(fused: Any, out: int, inp: int, dtype: torch.dtype, fixed: float) -> GemvTiming:
    cpu = torch.device("cpu")
    spec = hardware.ShapeSpec(out, inp, 1)
    fns = hardware.candidates(spec, dtype, "none", cpu, 1)
    fns = {c: f for c, f in fns.items() if c in LIBRARY}  # what the "linear" form runs
    copies = hardware.cold_copies(spec, dtype)
    g = torch.Generator().manual_seed(out * 31 + inp)
    weights = [(torch.randn(out, inp, generator=g) * 0.02).to(dtype) for _ in range(copies)]
    fns["fused"] = [partial(fused, w=w) for w in weights]
    times = hardware.time_kernels(fns, [torch.randn(1, inp, generator=g).to(dtype)], cpu)
    library = min(t[0] for c, t in times.items() if c != "fused")
    return GemvTiming(out, inp, round(max(times["fused"][0] - fixed, 0.0), 1), round(library, 1))


def build_lone_decode(
    model: Any, k_cache: list, v_cache: list, eps: float,
    policy: hardware.KernelPolicy | None = None, measure: Any = measure_gemv,
) -> LoneDecode:  # fmt: skip
    """LoneDecode with each weight shape in its fastest form here: int8 where the runner's
    policy quantizes and chose torch's int8 kernel for one row, genserve's gemv where the
    policy chose it for one row, else fused_gemv where it measured faster than the library's
    linear (measure_gemv), else the library's."""
    w = stack_layer(model.model.layers[0])
    shapes = [tuple(t.shape) for t in (w.qkv, w.o, w.gate_up, w.down, model.lm_head.weight)]
    quantize = policy is not None and policy.quantization == "int8"
    int8 = [s for s in shapes if quantize and _one_row_kernel(policy, s) == "int8"]
    native = [s for s in shapes if policy is not None and _one_row_kernel(policy, s) == "gemv"]
    dense = [s for s in dict.fromkeys(shapes) if s not in int8 and s not in native]
    timings = measure(dense, model.dtype) if dense else []
    forms = {s: "int8" for s in int8} | {s: "gemv" for s in native}
    forms |= {(t.out_features, t.in_features): "fused" for t in timings if t.fused_wins}
    said = [
        f"{t.out_features}x{t.in_features} {t.fused_us:.0f} vs {t.library_us:.0f}"
        + (" fused" if t.fused_wins else "")
        for t in timings
    ]
    said += [f"{o}x{i} int8" for o, i in dict.fromkeys(int8)]
    said += [f"{o}x{i} gemv" for o, i in dict.fromkeys(native)]
    log.info("compiled decode, one-row products (us, fused pass vs library): %s", "; ".join(said))
    return LoneDecode(model, k_cache, v_cache, eps, forms, quantize)


def _one_row_kernel(policy: hardware.KernelPolicy, shape: tuple[int, int]) -> str | None:
    plan = policy.plan(*shape)
    if plan is None:
        return None
    # The graph's custom op is gemv.c's float path: where the policy runs its VNNI variant,
    # the same int8 weights (sums rounded otherwise), the closest form a graph holds.
    return "gemv" if plan.choices[0] == "vnni" else plan.choices[0]
