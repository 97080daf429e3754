"""Which part of a step makes a row's logits depend on its batch, on the device it finds.

    PYTHONPATH=. python bench/invariance_probe.py [--device cuda] [--dtype fp32]

On the H200 (2026-12-04) every batch-invariance test failed on CUDA (README, "On a GPU")
without saying where. This prints, for a small random Llama, whether a row's result is
bitwise the same alone and batched:
- FlexAttention alone (model/flex.py): one row's attention with and without other sequences
  in the same call, for a decode and for a prompt chunk;
- the runner as served, for each attention path (flex, sdpa) with the linear kernels measured
  on the device (hardware.measure_policy, as the server does) and without (plain F.linear),
  for the prompt step and the decode steps after it.
A "no" names the first place to look. On a CPU flex runs torch's eager reference, which is
not invariant for decode rows (2.4e-7 apart on the 2-core Xeon) and is not what the CPU serves
with; everything else should print "yes" there.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import flex, hardware
from genserve.model.runner import LlamaRunner

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK = 16


def chunk(rid: str, slot: int, ids: list[int], start: int, table: tuple[int, ...]) -> ChunkInput:
    return ChunkInput(rid, slot, tuple(ids), start, True, SamplingParams(), 0, blocks=table)


def verdict(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "yes"
    return f"no (largest difference {(a.float() - b.float()).abs().max().item():.3g})"


def flex_alone_or_batched(device: torch.device, dtype: torch.dtype) -> None:
    """Rows of sequence x attend over 40 cached positions alone, then beside three others."""
    if not flex.available():
        print("flex: not in this torch")
        return
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, rows = 8, 2, 32, 64 * BLOCK
    keys = torch.randn(kv_heads, rows, dim, generator=g).to(device, dtype)
    values = torch.randn(kv_heads, rows, dim, generator=g).to(device, dtype)
    fn = flex.attention_fn(device)
    masks = flex.StepMasks(BLOCK, rows, device)
    x = flex.FlexSpan((5, 9, 2), 40, 1)  # its 41st position: one decode row
    others = [flex.FlexSpan((10 + 4 * i, 11 + 4 * i, 12 + 4 * i), 20 + i, 1) for i in range(3)]
    for name, n in (("decode", 1), ("prompt chunk of 8", 8)):
        xs = flex.FlexSpan(x.table, x.start - n + 1, n)
        q = torch.randn(n + 3 * n, heads, dim, generator=g).to(device, dtype)
        alone = flex.attend(fn, q[:n], keys, values, masks.build([xs]))
        mates = [flex.FlexSpan(o.table, o.start, n) for o in others]
        batched = flex.attend(fn, q, keys, values, masks.build([xs, *mates]))
        print(f"flex attention, {name}, alone = batched: {verdict(alone, batched[:n])}")


def runner_alone_or_batched(model: LlamaForCausalLM, attention: str, measured: bool) -> None:
    device = model.device
    policy = None
    if measured:
        specs = hardware.model_specs(model.config, 64, 8)
        policy = hardware.measure_policy(specs, model.dtype, "none", device, 64, 8)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 300, (30,), generator=g).tolist()
    mates = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 17, 3)]
    tables = [tuple(range(4 * i, 4 * i + 4)) for i in range(4)]  # x's, then each mate's

    def new() -> LlamaRunner:
        return LlamaRunner(model, 8, 128, batch_invariant=True, policy=policy,
                           num_blocks=64, block_size=BLOCK, attention=attention)  # fmt: skip

    alone, batched = new(), new()
    if alone.attention != attention:
        print(f"runner, {attention}: not available here ({alone.attention} instead)")
        return
    a = [alone.execute(StepInput((chunk("x", 0, x, 0, tables[0]),)))[0]]
    first = [chunk(f"m{i}", i + 1, m, 0, tables[i + 1]) for i, m in enumerate(mates)]
    b = [batched.execute(StepInput((*first, chunk("x", 0, x, 0, tables[0]))))[-1]]
    lengths = [len(m) for m in mates]
    for step in range(3):
        pos = len(x) + step
        a.append(alone.execute(StepInput((chunk("x", 0, [7], pos, tables[0]),)))[0])
        decs = [chunk(f"m{i}", i + 1, [7], n + step, tables[i + 1]) for i, n in enumerate(lengths)]
        b.append(batched.execute(StepInput((*decs, chunk("x", 0, [7], pos, tables[0]))))[-1])
    kernels = "kernels measured here" if measured else "plain F.linear"
    print(
        f"runner, {attention}, {kernels}: prompt step {verdict(a[0], b[0])}; "
        f"decode steps {', '.join(verdict(p, q) for p, q in zip(a[1:], b[1:], strict=True))}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    a = p.parse_args()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    print(f"{device}, {a.dtype}, torch {torch.__version__}")
    flex_alone_or_batched(device, dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval().to(device, dtype)
    for attention in ("flex", "sdpa"):
        for measured in (True, False):
            runner_alone_or_batched(model, attention, measured)


if __name__ == "__main__":
    main()
