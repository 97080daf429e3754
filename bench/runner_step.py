"""The runner's step alone, in this process, on the device it finds: ms per decode step at
each row count, on the benchmark's SmolLM2-135M-shaped model, with a KV pool as large as a
server would make, then torch.profiler's busiest ops for the last row count.

    PYTHONPATH=. python bench/runner_step.py [--rows 1 32] [--dtype bf16] [--pool-blocks N]

Made for a GPU's first look (where does a decode step's time go: launches or kernels?); on
a CPU it runs the same steps through the CPU's paths. No HTTP, no engine: what a step costs
the runner. Each row count prefills its rows one prompt at a time, then times `--steps`
decode steps after five warm-ups.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import DEFAULT_MODEL_DIR, ModelSpec, ensure_model_dir
from transformers import AutoModelForCausalLM

from genserve.engine.kv_blocks import DEFAULT_BLOCK_SIZE
from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model.runner import LlamaRunner

BLOCK = DEFAULT_BLOCK_SIZE  # the engine's, as a server would run
PROMPT = 128
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pool-blocks", type=int, default=200_000, help="KV blocks of 16 tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(runner: LlamaRunner, rows: int) -> Callable[[], None]:
    """Prefill `rows` prompts in their own blocks; return a function that runs one decode step
    of all of them."""
    per = -(-(PROMPT + 512) // BLOCK)
    tables = [tuple(range(i * per, (i + 1) * per)) for i in range(rows)]
    params = SamplingParams()
    prompt = tuple(range(5, 5 + PROMPT))
    for i, table in enumerate(tables):
        runner.execute(StepInput((ChunkInput(f"r{i}", i, prompt, 0, True, params, 0,
                                             blocks=table),)))  # fmt: skip
    pos = [PROMPT]

    def step() -> None:
        chunks = tuple(
            ChunkInput(f"r{i}", i, (7,), pos[0], True, params, 0, blocks=table)
            for i, table in enumerate(tables)
        )
        runner.execute(StepInput(chunks))
        pos[0] += 1

    return step


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    folder = ensure_model_dir(DEFAULT_MODEL_DIR, ModelSpec())
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[a.dtype])
    model = model.to(device).eval()
    runner = LlamaRunner(model, max(a.rows), 2048, batch_invariant=False,
                         num_blocks=a.pool_blocks, block_size=BLOCK)  # fmt: skip
    print(f"{device} {a.dtype}: attention {runner.attention}, {runner.cache_rows} cache rows")
    step = None
    for rows in a.rows:
        step = decode_steps(runner, rows)
        for _ in range(5):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync(device)
        ms = (time.perf_counter() - start) / a.steps * 1e3
        print(f"rows {rows}: {ms:.2f} ms a step = {rows * 1e3 / ms:.0f} tok/s", flush=True)
    assert step is not None
    profile(step, device)


def profile(step: Callable[[], None], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync(device)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
