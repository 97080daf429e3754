"""LoRA adapters served beside their base model, applied per row (as LoRAX does).

A step's rows may each use a different adapter, or none: the base projections run once for
all rows, then each adapter adds B(A(h)) * scale to its own rows only. Adapters are read from
peft's format (adapter_config.json + adapter_model.safetensors), safetensors only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

if TYPE_CHECKING:
    from genserve.model.runner import Linear

# peft module name -> (our stacked projection, index of its slice in that stack)
TARGETS = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served on this base model; the message says why."""


@dataclass(frozen=True, slots=True)
class LoraStack:
    """One stacked projection (qkv, o, gate_up, down) of one layer, as two matmuls whatever
    the modules targeted: all A matrices stacked, and one B laid out block-diagonally over the
    stack's output (zeros where a module is not targeted), the adapter's scale folded in."""

    a: Linear  # [sum of ranks, in]
    b: Linear  # [out.stop - out.start, sum of ranks]
    out: slice  # the part of the stacked projection's output it adds to
    a_raw: torch.Tensor  # the same two matrices unpacked, to fuse adapters together
    b_raw: torch.Tensor


@dataclass(frozen=True, slots=True)
class FusedStack:
    """Every loaded adapter's LoRA for one stacked projection of one layer, side by side:
    one A matmul for all rows, a mask keeping each row's own adapter's rank columns, one B."""

    a: Linear  # [total rank, in]
    b: Linear  # [out.stop - out.start, total rank]
    owner: torch.Tensor  # [total rank]: index of the adapter each rank column belongs to
    out: slice
    a_raw: torch.Tensor  # the two matrices unpacked, float32 on the CPU (decode.c reads them)
    b_raw: torch.Tensor


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    layers: tuple[dict[str, LoraStack], ...]  # per layer: stack name -> its LoRA


@dataclass(frozen=True, slots=True)
class BaseShape:
    """What an adapter must fit: layer count and each projection's in/out sizes and slices."""

    num_layers: int
    in_features: dict[str, int]  # peft module name -> input width
    slices: dict[str, slice]  # peft module name -> output slice within its stack


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: no readable adapter_config.json ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are served, not {cfg.get('peft_type')}")
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: LoRA bias and fan_in_fan_out are not supported")
    return cfg


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """A peft LoRA folder's weights (safetensors only) and its scale (alpha/r, or alpha/sqrt(r)
    with rsLoRA)."""
    cfg = read_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"{path}: adapter_model.safetensors is missing (pickle is refused)")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    return load_file(str(weights_file)), scale


def load_adapter(name: str, path: Path, base: BaseShape, make_linear) -> Adapter:  # noqa: ANN001
    """Read, check against the base model, and pack the weights (make_linear packs one)."""
    weights, scale = read_adapter(path)
    grouped: list[dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]] = [
        {} for _ in range(base.num_layers)
    ]
    for (layer, module), (a, b) in sorted(_pairs(weights, base).items()):
        grouped[layer].setdefault(TARGETS[module][0], []).append((module, a, b * scale))
    layers = tuple(
        {stack: _stack(mods, base, make_linear) for stack, mods in d.items()} for d in grouped
    )
    return Adapter(name, layers)


def _stack(mods: list, base: BaseShape, make_linear) -> LoraStack:  # noqa: ANN001
    slices = [base.slices[module] for module, _, _ in mods]
    lo, hi = min(s.start for s in slices), max(s.stop for s in slices)
    rank = sum(a.shape[0] for _, a, _ in mods)
    b_full = torch.zeros(hi - lo, rank)
    col = 0
    for (_, a, b), sl in zip(mods, slices, strict=True):
        b_full[sl.start - lo : sl.stop - lo, col : col + a.shape[0]] = b
        col += a.shape[0]
    a_all = torch.cat([a for _, a, _ in mods])
    return LoraStack(make_linear(a_all), make_linear(b_full), slice(lo, hi), a_all, b_full)


def _pairs(raw: dict[str, torch.Tensor], base: BaseShape) -> dict:
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise AdapterError(f"unexpected adapter weight {key!r}")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= base.num_layers:
            raise AdapterError(f"adapter has layer {layer}; the base model has {base.num_layers}")
        found.setdefault((layer, module), {})[ab] = tensor.float()
    out = {}
    for (layer, module), ab in found.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise AdapterError(f"layer {layer} {module}: lora_A or lora_B is missing")
        sl = base.slices[module]
        if a.shape[1] != base.in_features[module] or b.shape[0] != sl.stop - sl.start:
            raise AdapterError(f"layer {layer} {module}: shapes do not fit the base model")
        out[(layer, module)] = (a, b)
    return out


@dataclass(slots=True)
class LoraSet:
    adapters: dict[str, Adapter] = field(default_factory=dict)
    make_linear: object = None  # packs a weight (the runner's Linear)
    # The base model's device: the fused path's owner index is compared with each step's rows
    # there (an adapter's raw matrices stay where its file was read: the CPU).
    device: torch.device | str = "cpu"
    # What the adapters' products compute in (None: the rows' own dtype). On a CPU the runner
    # packs them in float32: a rank-8 product of one bf16 row took 14-38 us there against
    # 2-6 in float32 (Zen 5), 120 of them a step; the delta is added into y rounding once.
    dtype: torch.dtype | None = None
    order: list[str] = field(default_factory=list)  # adapter -> index, for the fused path
    version: int = 0  # counts the changes to the loaded set (what was fused from it is stale)
    _fused: dict[tuple[int, str], FusedStack | None] = field(default_factory=dict)

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter
        self._changed()

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._changed()

    def _changed(self) -> None:
        self.order = sorted(self.adapters)
        self._fused = {}
        self.version += 1

    def apply(
        self,
        layer: int,
        stack: str,
        h: torch.Tensor,
        y: torch.Tensor,
        groups: dict,
        pad_single: bool = False,
    ) -> None:
        """y[rows] += B(A(h[rows])) for each adapter's rows: contiguous (start, end) ranges,
        since the scheduler orders a step's sequences by adapter, so these are views. Each
        row's sums depend only on its own adapter: the batch-invariant path (pad_single: a
        lone row is padded, as in the base linears)."""
        for name, ranges in groups.items():
            lora = self.adapters[name].layers[layer].get(stack)
            if lora is None:
                continue
            for start, end in ranges:
                low = lora.a(self._rows(h[start:end]), pad_single)
                y[start:end, lora.out] += lora.b(low, pad_single)

    def apply_fused(
        self, layer: int, stack: str, h: torch.Tensor, y: torch.Tensor, owner: torch.Tensor
    ) -> None:
        """The same for all rows in four ops whatever the number of adapters (`owner` is each
        row's adapter index, -1 for none): fewer, larger ops than one pass per adapter."""
        fused = self.fused(layer, stack)
        if fused is None:
            return
        low = fused.a(self._rows(h)) * (owner[:, None] == fused.owner[None, :])
        y[:, fused.out] += fused.b(low)

    def _rows(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.dtype is None or h.dtype == self.dtype else h.to(self.dtype)

    def fused(self, layer: int, stack: str) -> FusedStack | None:
        """Every loaded adapter's LoRA for one projection of one layer, side by side."""
        key = (layer, stack)
        if key not in self._fused:
            self._fused[key] = self._fuse(layer, stack)
        return self._fused[key]

    def _fuse(self, layer: int, stack: str) -> FusedStack | None:
        parts = [
            (i, s)
            for i, name in enumerate(self.order)
            if (s := self.adapters[name].layers[layer].get(stack)) is not None
        ]
        if not parts:
            return None
        lo, hi = min(s.out.start for _, s in parts), max(s.out.stop for _, s in parts)
        rank = sum(s.a_raw.shape[0] for _, s in parts)
        b_all = torch.zeros(hi - lo, rank)
        owner, col = [], 0
        for i, s in parts:
            r = s.a_raw.shape[0]
            b_all[s.out.start - lo : s.out.stop - lo, col : col + r] = s.b_raw
            owner += [i] * r
            col += r
        a_all = torch.cat([s.a_raw for _, s in parts])
        return FusedStack(
            self.make_linear(a_all),
            self.make_linear(b_all),
            torch.tensor(owner, device=self.device),
            slice(lo, hi),
            a_all,
            b_all,
        )
