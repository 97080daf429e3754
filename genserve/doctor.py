"""`genserve doctor`: what this machine offers and which kernels genserve picks on it."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def run_doctor(
    model: str, dtype: str, quantization: str, data_dir: str, slots: int, chunk: int,
    remeasure: bool,
) -> None:  # fmt: skip
    import torch
    from transformers import AutoConfig

    from genserve.model import hardware
    from genserve.model.loading import pick_device, pick_dtype, resolve_model_ref

    device = pick_device("auto")
    features = hardware.detect(device)
    typer.echo(features.line())
    typer.echo(f"bf16 units usable: {features.bf16}; load average {os.getloadavg()}")
    if device.type == "cpu":
        typer.echo(f"read bandwidth: {hardware.read_bandwidth():.1f} GB/s (256 MiB sum, best of 5)")
    config = AutoConfig.from_pretrained(resolve_model_ref(model))
    cache = None if remeasure else Path(data_dir) / "cache"
    compute = pick_dtype(dtype, device, config, cache)
    typer.echo(f"model {model}: dtype {dtype} -> {compute}, quantization {quantization}")
    specs = hardware.model_specs(config, chunk, slots)
    policy = hardware.policy_for(specs, compute, quantization, device, chunk, slots, cache)
    typer.echo(f"kernels ({policy.source}, {policy.seconds:.2f}s to measure), us per call:")
    typer.echo(f"  {'shape':>12s} {'kernel':>7s} " + " ".join(f"{b:>9s}" for b in hardware.BUCKETS))
    for p in policy.plans:
        for kind, times in p.times_us.items():
            marks = [("*" if c == kind else " ") for c in p.choices]
            cells = " ".join(f"{t:8.1f}{m}" for t, m in zip(times, marks, strict=True))
            inv = " invariant" + (" (pad 1 row)" if p.pad_single else "")
            tail = inv if kind == p.invariant else ""
            typer.echo(f"  {p.out_features:>5d}x{p.in_features:<6d} {kind:>7s} {cells}{tail}")
    typer.echo("(* the kernel chosen for that bucket; 'invariant' runs seeded/deterministic rows)")
    _ = torch  # imported first: transformers' import is slower without it loaded
