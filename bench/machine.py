"""The machine a benchmark ran on: CPU model and features, threads, measured read bandwidth,
and the bandwidth roofline of a decode step (every weight is read once per token)."""

from __future__ import annotations

import json
import os
import platform
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from genserve.model.hardware import cap_allows_bf16

FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx2")
# Bytes per weight of each precision the throughput bench can ask for. "auto" computes in
# bf16 where the CPU has AMX or AVX512-BF16 (issue 14), fp32 elsewhere. llama.cpp's GGUF
# formats are its peers: Q8_0 keeps an fp16 scale per 32 int8 weights.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "f32": 4.0, "q8_0": 34 / 32}


@dataclass(frozen=True, slots=True)
class Machine:
    cpu: str
    features: tuple[str, ...]  # those of FEATURES the CPU reports
    cpus: int
    torch_threads: int
    read_gb_s: float  # best of a few sums over a large fp32 tensor

    def line(self) -> str:
        flags = " ".join(self.features) or "none of " + "/".join(FEATURES)
        return (
            f"machine: {self.cpu}; {flags}; {self.cpus} CPUs, {self.torch_threads} torch "
            f"threads; read bandwidth {self.read_gb_s:.1f} GB/s; load average {os.getloadavg()}"
        )

    def weight_bytes(self, precision: str) -> float:
        if precision.startswith("llama.cpp-"):  # llama.cpp-q8_0: a GGUF format
            return WEIGHT_BYTES[precision.removeprefix("llama.cpp-")]
        if precision == "transformers-serve":  # served from the fp32 folder
            return WEIGHT_BYTES["fp32"]
        precision = precision.split("-")[0]  # fp32-nocache: fp32 weights
        if precision == "auto":  # bf16 where the units are there and oneDNN may use them
            cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
            fast_bf16 = {"amx_bf16", "avx512_bf16"} & set(self.features) and cap_allows_bf16(cap)
            return WEIGHT_BYTES["bf16" if fast_bf16 else "fp32"]
        return WEIGHT_BYTES[precision]


def cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break  # the first CPU's; all cores of one socket report the same
    return model, tuple(f for f in FEATURES if f in flags)


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 4, threads: int | None = None) -> float:
    """Sum a `gib` GiB fp32 tensor a few times; the best pass is the read bandwidth."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    data = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    data.sum()  # first touch and warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    size = data.numel() * 4
    del data
    return size / best / 1e9


def describe(threads: int | None, gib: float = 1.0) -> Machine:
    import torch

    cpu, features = cpu_model_and_flags()
    bandwidth = read_bandwidth_gb_s(gib, threads=threads)
    return Machine(cpu, features, os.cpu_count() or 1, torch.get_num_threads(), bandwidth)


def parameter_count(model_dir: Path) -> int:
    """Weights in the folder's safetensors files, read from their headers (no tensor loaded).
    A tied embedding is stored once and read once per token, as the lm_head."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def roofline_tok_s(machine: Machine, params: int, precision: str) -> float:
    """One stream's ceiling: bandwidth / weight bytes read per token."""
    return machine.read_gb_s * 1e9 / (params * machine.weight_bytes(precision))
