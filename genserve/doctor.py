"""`genserve doctor`: what this machine offers and which kernels genserve picks on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from genserve.config import ServerConfig

if TYPE_CHECKING:
    from genserve.model.hardware import KernelPolicy


def run_doctor(cfg: ServerConfig, remeasure: bool) -> None:
    """What `genserve serve` with the same options decides at start-up (genserve.runtime.build:
    load_model's dtype, kernel_policy's kernels), printed with the times behind it."""
    import torch
    from transformers import AutoConfig

    from genserve.model import hardware, native
    from genserve.model.loading import pick_device, pick_dtype, resolve_model_ref

    mc, slots, chunk = cfg.model, cfg.engine.max_batch_size, cfg.engine.max_num_batched_tokens
    native.set_enabled(cfg.engine.native_kernels)  # as build_engine: kernels on offer
    device = pick_device(mc.device)
    features = hardware.detect(device)
    typer.echo(features.line())
    typer.echo(f"bf16 units usable: {features.bf16}; load average {os.getloadavg()}")
    if device.type == "cpu":
        typer.echo(f"read bandwidth: {hardware.read_bandwidth():.1f} GB/s (256 MiB sum, best of 5)")
    config = AutoConfig.from_pretrained(resolve_model_ref(mc.ref))
    cache = None if remeasure else Path(cfg.storage.data_dir) / "cache"
    compute = pick_dtype(mc.dtype, device, config, cache)
    typer.echo(f"model {mc.ref}: dtype {mc.dtype} -> {compute}, quantization {mc.quantization}")
    specs = hardware.model_specs(config, chunk, slots)
    print_policy(hardware.policy_for(specs, compute, mc.quantization, device, chunk, slots, cache))
    _ = torch  # imported first: transformers' import is slower without it loaded


def print_policy(policy: KernelPolicy) -> None:
    from genserve.model.hardware import BUCKETS

    typer.echo(f"kernels ({policy.source}, {policy.seconds:.2f}s to measure), us per call:")
    typer.echo(f"  {'shape':>12s} {'kernel':>7s} " + " ".join(f"{b:>9s}" for b in BUCKETS))
    for p in policy.plans:
        for kind, times in p.times_us.items():
            marks = [("*" if c == kind else " ") for c in p.choices]
            cells = " ".join(f"{t:8.1f}{m}" for t, m in zip(times, marks, strict=True))
            inv = " invariant" + (" (pad 1 row)" if p.pad_single else "")
            tail = inv if kind == p.invariant else ""
            typer.echo(f"  {p.out_features:>5d}x{p.in_features:<6d} {kind:>7s} {cells}{tail}")
    typer.echo("(* the kernel chosen for that bucket; 'invariant' runs seeded/deterministic rows)")
    typer.echo(policy.against_linear())
