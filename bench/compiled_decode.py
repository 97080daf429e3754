"""One-token decode of a SmolLM2-135M-shaped Llama (random weights), eager against
`torch.compile` with the weights frozen as constants, in this one process.

    PYTHONPATH=. python bench/compiled_decode.py [--dtype bf16] [--steps 40] [--context 128]

Not genserve's runner: a minimal module with the same math for one sequence (RMSNorm,
stacked qkv and gate/up projections, rotary, a KV cache written in place, SDPA over the
cached prefix), so that what compiling a decode step buys on this machine can be measured
before the runner grows a compiled path. Each layer's cache is a buffer of its own: one
buffer for all layers, mutated through views, made inductor copy the whole cache per layer
(54-64 ms a step against 31 ms eager, bf16, 2-core Xeon). Prints the compile time, the
step times and the largest difference between the two sides' logits.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from genserve.model.runner import _rope

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152


def weight(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter((torch.randn(*shape) * 0.02).to(dtype), requires_grad=False)


def ones(dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.ones(HIDDEN, dtype=dtype), requires_grad=False)


class Decode(nn.Module):
    """forward(token [1], position [1], cos, sin, length) -> logits [1, vocab] float32."""

    def __init__(self, dtype: torch.dtype, cache_len: int) -> None:
        super().__init__()
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        self.embed = weight(VOCAB, HIDDEN, dtype=dtype)  # tied: also the LM head
        self.norms = nn.ParameterList(ones(dtype) for _ in range(2 * LAYERS + 1))
        self.qkv = nn.ParameterList(weight(q + 2 * kv, HIDDEN, dtype=dtype) for _ in range(LAYERS))
        self.o = nn.ParameterList(weight(HIDDEN, q, dtype=dtype) for _ in range(LAYERS))
        self.gate_up = nn.ParameterList(
            weight(2 * INTER, HIDDEN, dtype=dtype) for _ in range(LAYERS)
        )
        self.down = nn.ParameterList(weight(HIDDEN, INTER, dtype=dtype) for _ in range(LAYERS))
        for i in range(LAYERS):
            for name in ("k", "v"):
                cache = torch.zeros(KV_HEADS, cache_len, HEAD_DIM, dtype=dtype)
                self.register_buffer(f"{name}{i}", cache)

    def forward(
        self, token: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        length: int,
    ) -> torch.Tensor:  # fmt: skip
        x = self.embed[token]
        for i in range(LAYERS):
            x = self.layer(i, x, position, cos, sin, length)
        return F.linear(rms(x, self.norms[-1]), self.embed).float()

    def layer(self, i: int, x, position, cos, sin, length: int) -> torch.Tensor:  # noqa: ANN001
        q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        qkv = F.linear(rms(x, self.norms[2 * i]), self.qkv[i])
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _rope(q.view(1, HEADS, HEAD_DIM), cos, sin)
        k = _rope(k.view(1, KV_HEADS, HEAD_DIM), cos, sin)
        keys.index_copy_(1, position, k.transpose(0, 1))
        values.index_copy_(1, position, v.view(1, KV_HEADS, HEAD_DIM).transpose(0, 1))
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None, :, :length], values[None, :, :length],
            enable_gqa=True,
        )  # fmt: skip
        x = x + F.linear(attn[0].transpose(0, 1).reshape(1, q_size), self.o[i])
        gate, up = F.linear(rms(x, self.norms[2 * i + 1]), self.gate_up[i]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down[i])


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


def rotary(position: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    angles = torch.cat([position * inv] * 2)[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def steps(model: nn.Module, first: int, count: int, dtype: torch.dtype) -> tuple[list, list]:
    """Decode `count` tokens at positions first..; returns (seconds per step, logits)."""
    times, logits = [], []
    for p in range(first, first + count):
        cos, sin = rotary(p, dtype)
        t0 = time.perf_counter()
        out = model(torch.tensor([p % VOCAB]), torch.tensor([p]), cos, sin, p + 1)
        times.append(time.perf_counter() - t0)
        logits.append(out)
    return times, logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--context", type=int, default=128, help="cached positions before timing")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cache_len = args.context + args.steps + 8
    eager = Decode(dtype, cache_len).eval()
    compiled_model = Decode(dtype, cache_len).eval()
    compiled_model.load_state_dict(eager.state_dict())  # the same weights, caches apart
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants: oneDNN prepacks them at compile time
    compiled = torch.compile(compiled_model)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    with torch.inference_mode():
        t0 = time.perf_counter()
        steps(compiled, 0, 2, dtype)  # the second call compiles the length as dynamic
        print(f"compile (two calls): {time.perf_counter() - t0:.1f} s")
        steps(eager, 0, 2, dtype)
        # the prefix both sides attend, written one token at a time (not timed)
        steps(eager, 2, args.context - 2, dtype)
        steps(compiled, 2, args.context - 2, dtype)
        eager_t, eager_out = steps(eager, args.context, args.steps, dtype)
        comp_t, comp_out = steps(compiled, args.context, args.steps, dtype)
    diff = max((a - b).abs().max().item() for a, b in zip(eager_out, comp_out, strict=True))
    same = sum(int(a.argmax() == b.argmax()) for a, b in zip(eager_out, comp_out, strict=True))
    for name, t in (("eager", eager_t), ("compiled", comp_t)):
        t = sorted(t)
        print(f"{name:9s} step min {t[0] * 1e3:6.2f} ms, median {t[len(t) // 2] * 1e3:6.2f} ms")
    ratio = sorted(eager_t)[len(eager_t) // 2] / sorted(comp_t)[len(comp_t) // 2]
    print(f"compiled / eager speed (medians): {ratio:.2f}x")
    print(f"logits: largest difference {diff:.4f}, same argmax in {same}/{args.steps} steps")


if __name__ == "__main__":
    main()
