"""The linear kernels the fast path can run, each built from one weight: y = x W^T + b.

- `linear`: plain F.linear in the compute dtype (torch's default BLAS path).
- `onednn`: the weight prepacked for oneDNN (fp32 or bf16; AMX where the CPU has it).
- `int8`: weight-only int8 with one scale per output channel, through torch's own
  `aten._weight_int8pack_mm` (activations in bf16, dequantized inside the kernel).
- `gemv`: genserve's own row-by-row kernel (gemv.c via native.py, built for this CPU), over the int8
  weights when the layer is quantized, else over the weight in the compute dtype. It streams
  the weight once per call, so it is a candidate for the few rows of a decode step.
- `vnni`: the same kernel over the int8 weights with AVX512-VNNI integer dot products (each row
  of x quantized to int16, sums exact), where the CPU has them; a quantized layer's
  candidate for the same rows as `gemv`.
- `amx`: genserve's AMX-tile kernel (amx.c), bf16 only, where the CPU has AMX: the weight
  packed into tiles, streamed once per call for up to 32 rows at a time; a candidate for a
  batched decode step's 9-64 rows.

Which one runs for which row count is measured at start-up (genserve.model.hardware). With
`--quantization int8`, `linear` and `onednn` run on the int8 weights dequantized, so every
kernel computes with the same (quantized) weights and only their summation order differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genserve.model import native

KERNELS = ("linear", "onednn", "int8", "gemv", "vnni", "amx", "dp")
# kernels that read the int8 weights themselves, not dequantized
QUANTIZED = ("int8", "gemv", "vnni")
Kernel = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """Symmetric int8 per output channel: W ~= q * scales[:, None]."""

    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] float32

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.float() * self.scales[:, None]).to(dtype)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    w = weight.float()
    # -127..127, not -128: symmetric, so a row's largest weight maps exactly to +-127.
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(q.contiguous(), scales)


def onednn_ok(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def available(dtype: torch.dtype, device: torch.device, quantization: str) -> tuple[str, ...]:
    """Kernels worth timing for this precision on this device."""
    probe = torch.empty(0, dtype=dtype, device=device)
    names = ["linear"] + (["onednn"] if onednn_ok(probe) else [])
    if quantization == "int8" and hasattr(torch, "_weight_int8pack_mm"):
        names.insert(0, "int8")
    if device.type == "cpu" and dtype in native.DTYPES and native.library() is not None:
        names.append("gemv")
        if quantization == "int8" and native.vnni_ready():
            names.append("vnni")
        if dtype == torch.bfloat16 and native.amx_ready():
            names.append("amx")
        if dtype == torch.bfloat16 and native.dp_ready():
            names.append("dp")
    return tuple(names)


def build(
    kind: str,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    quant: QuantizedWeight | None,
    batch_hint: int,
    glu: bool = False,
) -> Kernel:
    """A callable for one kernel. `weight` is in the compute dtype (already dequantized when
    the layer is quantized; None when only QUANTIZED kernels are built); `quant`, where the
    layer is quantized, is what `int8`, `gemv` and `vnni` read. `glu`: the weight is a gated MLP's
    [gate; up], which `amx` packs so that it can also give SiLU(gate) * up (native.Amx)."""
    if kind == "linear":
        return lambda x: F.linear(x, weight, bias)
    if kind == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=batch_hint)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if kind == "int8":
        return _int8_kernel(quant, bias)
    if kind == "gemv":
        if quant is not None:
            return native.Gemv(quant.q, quant.scales, bias)
        return native.Gemv(weight, None, bias)
    if kind == "vnni":
        if quant is None:
            raise ValueError("the vnni kernel needs quantized weights")
        return native.Gemv(quant.q, quant.scales, bias, vnni=True)
    if kind == "amx":
        glu = glu and bias is None and weight.shape[0] % 32 == 0
        return native.Amx(weight, bias, glu=glu)
    if kind == "dp":
        return native.Dp(weight, bias)
    raise ValueError(f"unknown kernel {kind!r}; known: {KERNELS}")


# torch 2.13's CPU int8 kernel reads the inner dimension in whole vectors of 16 with no
# tail: on a 2-core AMX Xeon an in_features of 4, 8, 12 or 24 crashed the process or gave
# wrong sums (NaN at one row) from two rows up; multiples of 16 were exact. Real models'
# widths are multiples of 64; a tiny one computes such shapes with the other kernels.
INT8_IN_MULTIPLE = 16


def _int8_kernel(quant: QuantizedWeight | None, bias: torch.Tensor | None) -> Kernel:
    if quant is None:
        raise ValueError("the int8 kernel needs quantized weights")
    if quant.q.device.type == "cpu" and quant.q.shape[1] % INT8_IN_MULTIPLE:
        raise ValueError(
            f"the int8 kernel needs in_features a multiple of {INT8_IN_MULTIPLE} on CPU, "
            f"not {quant.q.shape[1]}"
        )
    # torch's CPU kernel is vectorized for bf16 activations; fp32 ones ran 10-100x slower
    # (measured on a 2-core AVX-512 machine), so activations are cast on the way in.
    q, scales = quant.q, quant.scales.to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # the runner's bf16: no casts (two calls less per linear)
            y = torch._weight_int8pack_mm(x, q, scales)
        else:
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)
        return y if bias is None else y.add_(bias)

    return run
