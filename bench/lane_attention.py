"""Decode attention over the KV lanes: torch's SDPA on the lanes' views (as runner.py calls
it) against genserve's attend.c (model/native.py), in this one process, interleaved, on a
SmolLM2-135M-shaped layer (9 query heads over 3 KV heads of 64 dims).

    PYTHONPATH=. python bench/lane_attention.py [--lanes 32] [--length 528] [--dtype bf16]

Each of `--layers` layers has its own cache (so a layer's keys come from memory, as in a
step); each lane attends a random length between half of --length and --length (the first
the whole). Prints ms per layer for each, the ratio, and the largest difference.
"""

from __future__ import annotations

import argparse
import time

import torch

from genserve.model import native
from genserve.model.runner import _grouped_attention

KV, HEADS, DIM = 3, 9, 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lanes", type=int, default=32)
    ap.add_argument("--length", type=int, default=528)
    ap.add_argument("--lane-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    if native.library() is None:
        raise SystemExit("attend.c is not built here (no C compiler): nothing to compare")
    if not 1 <= a.length <= a.lane_len:
        raise SystemExit("--length must be between 1 and --lane-len")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    rows = a.lanes * a.lane_len
    caches = [
        tuple(torch.randn(KV, rows, DIM, generator=g).to(dtype) for _ in range(2))
        for _ in range(a.layers)
    ]
    q = torch.randn(a.lanes, HEADS, DIM, generator=g).to(dtype)
    lengths = torch.randint(a.length // 2 + 1, a.length + 1, (a.lanes,), generator=g)
    lengths[0] = a.length
    visible = torch.arange(a.length)[None] < lengths[:, None]
    mask = torch.zeros(a.lanes, a.length, dtype=dtype).masked_fill_(~visible, float("-inf"))
    mask = mask[:, None, None]
    lanes = torch.arange(a.lanes, dtype=torch.int32)
    lengths32 = lengths.to(torch.int32)

    def sdpa(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        view = (KV, a.lanes, a.lane_len, DIM)
        keys = k.view(view)[:, :, : a.length].transpose(0, 1)
        values = v.view(view)[:, :, : a.length].transpose(0, 1)
        return _grouped_attention(q, keys, values, mask)

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return native.attend_lanes(q, k, v, lanes, lengths32, 0, a.lane_len)

    sides = {"sdpa": sdpa, "attend.c": attend}
    with torch.inference_mode():
        diff = (sdpa(*caches[0]).float() - attend(*caches[0]).float()).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(a.rounds):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                for k, v in caches:
                    fn(k, v)
                times[name].append((time.perf_counter() - t0) / a.layers * 1e3)
    print(f"{a.lanes} lanes of up to {a.length} positions, {a.dtype}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    for name, ms in median.items():
        print(f"{name:9s} {ms:.3f} ms a layer (median of {a.rounds}), best {min(times[name]):.3f}")
    print(f"attend.c / sdpa speed: {median['sdpa'] / median['attend.c']:.2f}x; "
          f"largest difference {diff:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
