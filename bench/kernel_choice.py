"""Kernels on this machine: per weight shape and row bucket, each candidate's time and the
choice; then a decode step of a SmolLM2-135M-shaped random Llama at B=1 and B=32 for fp32,
bf16 and int8, against the same runner with plain F.linear fp32, all in this one process.

    PYTHONPATH=. python bench/kernel_choice.py [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import hardware
from genserve.model.hardware import KernelPolicy, ShapePlan
from genserve.model.runner import LlamaRunner

SMOL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=2048)  # fmt: skip
CPU = torch.device("cpu")


def plain_policy(specs) -> KernelPolicy:  # noqa: ANN001
    plans = tuple(
        ShapePlan(s.out_features, s.in_features, ("linear",) * 4, "linear", False) for s in specs
    )
    return KernelPolicy("float32", "none", plans, "fixed")


def decode_runner(model, policy: KernelPolicy, batch: int) -> tuple[LlamaRunner, list]:  # noqa: ANN001
    r = LlamaRunner(model, batch, 256, batch_invariant=False, policy=policy)
    p = SamplingParams()
    r.execute(
        StepInput(tuple(ChunkInput(str(i), i, (1,) * 64, 0, True, p, 0) for i in range(batch)))
    )
    step = StepInput(tuple(ChunkInput(str(i), i, (2,), 64, True, p, 0) for i in range(batch)))
    return r, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    f = hardware.detect(CPU)
    print(f.line(), "| load", os.getloadavg())
    bw = hardware.read_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOL)
    specs = hardware.model_specs(cfg, 512, 32)
    setups = {"F.linear fp32": (torch.float32, plain_policy(specs))}
    for name, dtype, quant in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                               ("int8", torch.bfloat16, "int8")):  # fmt: skip
        pol = hardware.measure_policy(specs, dtype, quant, CPU, 512, 32)
        print(f"\n{name}: measured in {pol.seconds:.2f}s: {pol.summary()}")
        for pl in pol.plans:
            cells = "  ".join(f"{k}={[round(t) for t in v]}" for k, v in pl.times_us.items())
            print(f"  {pl.out_features}x{pl.in_features}: {cells}")
        setups[name] = (dtype, pol)
    base = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in base.parameters())  # tied: the LM head read, once
    print(f"\nweights read per step ~{params / 1e6:.0f}M; roofline steps/s at {bw:.1f} GB/s: "
          f"fp32 {bw * 1e9 / (4 * params):.0f}, bf16 {bw * 1e9 / (2 * params):.0f}, "
          f"int8 {bw * 1e9 / params:.0f}")  # fmt: skip
    for batch in (1, 32):
        # A copy per precision: Module.to converts in place, and runners keep the tensors.
        runs = {
            n: decode_runner(copy.deepcopy(base).to(d), p, batch) for n, (d, p) in setups.items()
        }
        best = {n: float("inf") for n in runs}
        for _ in range(args.reps):  # interleaved: a neighbour's load falls on all alike
            for n, (r, step) in runs.items():
                t0 = time.perf_counter()
                r.execute(step)
                best[n] = min(best[n], time.perf_counter() - t0)
        ref = best["F.linear fp32"]
        print(f"B={batch} decode step (best of {args.reps}), load {os.getloadavg()}:")
        for n, t in best.items():
            print(f"  {n:14s} {t * 1e3:7.1f} ms  {batch / t:7.1f} tok/s  {ref / t:4.2f}x F.linear")
        del runs


if __name__ == "__main__":
    main()
