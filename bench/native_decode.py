"""Decode steps of free streams: eager torch against decode.c's two paths (model/native.py:
every layer in one C call, the "stack"; C stages between torch's linears, the "glue"), in
this one process, interleaved, on the bench model (SmolLM2-135M-shaped, random weights).

    PYTHONPATH=. python bench/native_decode.py [--dtype bf16] [--quantization none]
                                               [--rows 1 4 32] [--steps 30] [--context 128]
                                               [--adapter]

The runner is the server's (`LlamaRunner` under the kernel policy measured for this machine,
cached in a temporary folder); each row decodes on its own lane from a --context-token
prompt. Prints, per row count, the median step of each path, its ratio to eager, and the
largest difference of its logits from eager's on one step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DEFAULT_MODEL_DIR, ModelSpec, ensure_model_dir
from costs import ADAPTERS, make_adapters
from transformers import AutoModelForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import hardware, native
from genserve.model.runner import LlamaRunner

SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)  # free rows: what decode.c may serve


def steps(rows: int, start: int, token: int, adapter: str | None = None) -> StepInput:
    return StepInput(tuple(
        ChunkInput(f"r{j}", j, (token,), start, True, SAMPLED, 1, adapter) for j in range(rows)
    ))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--quantization", choices=["none", "int8"], default="none")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument(
        "--adapter",
        action="store_true",
        help="every row through a random rank-8 LoRA adapter (bench/costs.py's)",
    )
    a = ap.parse_args()
    if native.library() is None:
        raise SystemExit("decode.c is not built here (no C compiler): nothing to compare")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model_dir = ensure_model_dir(DEFAULT_MODEL_DIR, ModelSpec())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    slots = max(a.rows)
    specs = hardware.model_specs(model.config, 512, slots)
    with tempfile.TemporaryDirectory() as cache:
        policy = hardware.policy_for(specs, dtype, a.quantization, torch.device("cpu"), 512,
                                     slots, cache_dir=Path(cache))  # fmt: skip
    runner = LlamaRunner(model, slots, a.context + len(a.rows) * (a.steps + 1) + 8, False, policy)
    paths = {"eager": None, "stack": runner._through_stack, "glue": runner._through_glue}
    for kind, built in (("stack", runner.native_stack), ("glue", runner.native_glue)):
        if built is None:  # e.g. no linear with a gemv kernel: no stack
            paths.pop(kind)
    print(f"{a.dtype}, quantization {a.quantization}, context {a.context}; start-up choice:",
          {b: p.__name__ for b, p in runner.native_decode.items()})  # fmt: skip
    adapter = with_adapter(runner, model_dir) if a.adapter else None
    with torch.inference_mode():
        for j in range(slots):
            prompt = tuple(range(100 + j, 100 + j + a.context))
            chunk = ChunkInput(f"r{j}", j, prompt, 0, True, SAMPLED, 0, adapter)
            runner.execute(StepInput((chunk,)))
        start = a.context
        for rows in a.rows:
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(a.steps):
                for kind, path in paths.items():  # each path writes the same cache rows
                    runner.native_decode = dict.fromkeys((0, 1, 2), path) if path else {}
                    t0 = time.perf_counter()
                    runner.execute(steps(rows, start, 5, adapter))
                    times[kind].append(time.perf_counter() - t0)
                start += 1
            logits = {}
            for kind, path in paths.items():
                runner.native_decode = dict.fromkeys((0, 1, 2), path) if path else {}
                logits[kind] = runner.execute(steps(rows, start, 7, adapter))
            start += 1
            eager = statistics.median(times["eager"])
            for kind, ts in times.items():
                med = statistics.median(ts)
                diff = (logits[kind] - logits["eager"]).abs().max().item()
                print(f"{rows:3d} rows  {kind:5s}  {med * 1e3:7.2f} ms  "
                      f"{eager / med:5.2f}x eager  max |logits - eager's| {diff:.4f}")  # fmt: skip


def with_adapter(runner: LlamaRunner, model_dir: Path) -> str:
    """bench/costs.py's first random adapter (rank 8 on every projection), loaded."""
    folder = Path(tempfile.mkdtemp(prefix="native-decode-"))
    make_adapters(model_dir, folder)
    runner.add_adapter(ADAPTERS[0], folder / "a0")
    print(f"every row through {ADAPTERS[0]} (rank 8 on every projection)")
    return ADAPTERS[0]


if __name__ == "__main__":
    main()
