"""LoRA adapters for `BatchedHFRunner`, applied per row through forward hooks.

Any model's Linear modules can carry an adapter this way, whatever their names (q_proj,
qkv_proj, query_key_value, ...): the hook adds B(A(x)) * scale to the rows of the sequences
that asked for that adapter, after the base projection ran once for all rows. Adapters are
read from peft's format (adapter_config.json + adapter_model.safetensors), safetensors only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.engine.types import ChunkInput
from genserve.model.lora import AdapterError, read_adapter

# peft saves `base_model.model.<module path>.lora_A.weight` (older: `.lora_A.default.weight`)
KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True, slots=True)
class ModuleLora:
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank], the adapter's scale folded in


class HookLora:
    """Adapters by name; during a forward, `rows` says which rows use which adapter."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.adapters: dict[str, dict[str, ModuleLora]] = {}
        self._hooked: set[str] = set()
        self._rows: dict[str, list[tuple[int, int]]] = {}  # adapter -> row ranges, this forward

    def add(self, name: str, path: Path) -> None:
        weights, scale = read_adapter(path)
        mods = self._modules(weights, scale)
        for module in mods:
            self._hook(module)
        self.adapters[name] = mods

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    @contextmanager
    def rows(self, chunks: list[ChunkInput]) -> Iterator[None]:
        """Set each adapter's rows in the flat batch for the forward run inside."""
        rows: dict[str, list[tuple[int, int]]] = {}
        row = 0
        for c in chunks:
            n = len(c.token_ids)
            if c.adapter is not None:
                rows.setdefault(c.adapter, []).append((row, row + n))
            row += n
        self._rows = rows
        try:
            yield
        finally:
            self._rows = {}

    def _modules(self, raw: dict[str, torch.Tensor], scale: float) -> dict[str, ModuleLora]:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            m = KEY.match(key)
            if m is None:
                raise AdapterError(f"unexpected adapter weight {key!r}")
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        return {module: self._check(module, ab, scale) for module, ab in pairs.items()}

    def _check(self, module: str, ab: dict[str, torch.Tensor], scale: float) -> ModuleLora:
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise AdapterError(f"{module}: lora_A or lora_B is missing")
        try:
            target = self.model.get_submodule(module)
        except AttributeError as e:
            raise AdapterError(f"{module}: no such module in the base model") from e
        if not hasattr(target, "in_features") or not hasattr(target, "weight"):
            raise AdapterError(f"{module}: only Linear modules take LoRA here")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise AdapterError(f"{module}: shapes do not fit the base model")
        w = target.weight
        return ModuleLora(a.to(w.device, w.dtype), (b * scale).to(w.device, w.dtype))

    def _hook(self, module: str) -> None:
        if module in self._hooked:
            return
        self.model.get_submodule(module).register_forward_hook(self._hook_fn(module))
        self._hooked.add(module)

    def _hook_fn(self, module: str):  # noqa: ANN202
        def hook(_mod: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            for name, ranges in self._rows.items():
                lora = self.adapters.get(name, {}).get(module)
                if lora is None:
                    continue
                x, y = inputs[0].flatten(0, -2), output.view(-1, output.shape[-1])
                for start, end in ranges:
                    y[start:end] += (x[start:end] @ lora.a.T) @ lora.b.T
            return output

        return hook
