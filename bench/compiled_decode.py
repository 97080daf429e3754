"""One-token decode of a SmolLM2-135M-shaped Llama (random weights): genserve's compiled
lone-decode module (`--compile-decode`, genserve/model/compiled.py) eager against compiled, in
this one process, with the logits compared.

    PYTHONPATH=. python bench/compiled_decode.py [--dtype bf16] [--steps 40] [--context 128]

Both sides are the same `LoneDecode` over the same weights, each with its own KV cache (a
tensor per layer: one tensor for all layers, written through views, made the compiled graph
copy the whole cache per layer, 54-64 ms a step against 31 ms eager, bf16, 2-core Xeon).
Prints the compile time, the step times and the largest difference between the logits.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.model.compiled import LoneDecode, build_lone_decode, compile_lone_decode

SMOL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=2048)  # fmt: skip


def caches(cfg: LlamaConfig, positions: int, dtype: torch.dtype) -> list[torch.Tensor]:
    shape = (cfg.num_key_value_heads, positions, cfg.hidden_size // cfg.num_attention_heads)
    return [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]


def steps(module, rotary, first: int, count: int) -> tuple[list[float], list[torch.Tensor]]:  # noqa: ANN001
    """Decode `count` tokens at positions first.. (run 0); (seconds per step, logits)."""
    times, logits = [], []
    for p in range(first, first + count):
        token, pos = torch.tensor([p % 1000]), torch.tensor([p])
        cos, sin = rotary(module.embed[token][None], pos[None])
        t0 = time.perf_counter()
        logits.append(module(token, pos, cos[0], sin[0], p + 1, p + 1))  # end, length
        times.append(time.perf_counter() - t0)
    return times, logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--context", type=int, default=128, help="cached positions before timing")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOL)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    rotary, eps, lane = model.model.rotary_emb, cfg.rms_norm_eps, args.context + args.steps + 8
    eager = LoneDecode(model, caches(cfg, 2 * lane, dtype), caches(cfg, 2 * lane, dtype), eps)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    t0 = time.perf_counter()
    module = build_lone_decode(
        model, caches(cfg, 2 * lane, dtype), caches(cfg, 2 * lane, dtype), eps
    )
    fused = sorted(shape for shape, form in module.forms.items() if form == "fused")
    print(f"fused one-row products for {fused or 'no shape'}")
    compiled = compile_lone_decode(module, rotary, lane)  # rows past the steps'
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    with torch.inference_mode():
        for side in (eager, compiled):  # the prefix both attend, written a token at a time
            steps(side, rotary, 0, args.context)
        eager_t, eager_out = steps(eager, rotary, args.context, args.steps)
        comp_t, comp_out = steps(compiled, rotary, args.context, args.steps)
    pairs = list(zip(eager_out, comp_out, strict=True))
    diff = max((a - b).abs().max().item() for a, b in pairs)
    same = sum(int(a.argmax() == b.argmax()) for a, b in pairs)
    for name, t in (("eager", sorted(eager_t)), ("compiled", sorted(comp_t))):
        print(f"{name:9s} step min {t[0] * 1e3:6.2f} ms, median {t[len(t) // 2] * 1e3:6.2f} ms")
    ratio = sorted(eager_t)[len(eager_t) // 2] / sorted(comp_t)[len(comp_t) // 2]
    print(f"compiled / eager speed (medians): {ratio:.2f}x")
    print(f"logits: largest difference {diff:.4f}, same argmax in {same}/{args.steps} steps")


if __name__ == "__main__":
    main()
