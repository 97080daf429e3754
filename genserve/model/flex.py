"""Every row of a step attends in one call per layer, on the paged KV cache as it is stored:
FlexAttention under a mask built once per step from the block tables (issue 20, item 1).

This is the runner's attention on CUDA. There, the CPU path's shape (a gather and an SDPA call
per sequence, or one padded call with a dense additive mask, which forces SDPA's math kernel)
would launch hundreds of kernels a step. Here nothing is gathered or padded: the keys are a
layer's whole cache `[kv_heads, rows, head_dim]`, and the mask says which cache rows each query
row sees.
- A cache row is visible to a query row when the row's block is in the query's sequence's
  table, at a logical position at or before the query's.
- Blocks shared by several sequences (a prefix-cache hit) hold the same positions in each.
- The block-sparse form of the mask (`create_block_mask`, tiles of KV_TILE cache rows) lets
  the kernel skip tiles that none of a query tile's sequences use.

Each query row's result does not depend on the rest of its batch. Its own tiles are always
visited in cache order. A tile it cannot see adds exact zeros and leaves the running maximum
unchanged. So batching cannot change a row's attention (DESIGN rule 4 for the attention part;
cuBLAS's linears are another matter).

On the CPU it runs eagerly (torch's reference implementation, dense scores), which is how the
unit tests check its masks against transformers. Serving on the CPU keeps the runner's own
path, which is measured faster there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

KV_TILE = 128  # cache rows per sparse tile: a multiple of the engine's block sizes (16 default)
Q_TILE = 128  # query rows per sparse tile


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class FlexSpan:
    """One chunk of the step, as the mask needs it: its rows are `n` consecutive ones of the
    flattened batch, at positions start..start+n-1, stored in blocks `table`."""

    table: tuple[int, ...]
    start: int
    n: int


@dataclass(frozen=True, slots=True)
class FlexMask:
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


def step_mask(
    spans: Sequence[FlexSpan], block_size: int, cache_rows: int, device: torch.device
) -> FlexMask:
    """The step's mask: built on the host as three small tables, copied to the device once
    (`inv` [sequences, cache blocks]: a block's logical index in each sequence, -1 where the
    sequence does not hold it; each query row's sequence and position)."""
    from torch.nn.attention.flex_attention import create_block_mask

    blocks = -(-cache_rows // block_size)
    inv = torch.full((len(spans), blocks), -1, dtype=torch.int32)
    seq_of_row: list[int] = []
    pos_of_row: list[int] = []
    for s, sp in enumerate(spans):
        used = -(-(sp.start + sp.n) // block_size)
        inv[s, torch.tensor(sp.table[:used], dtype=torch.long)] = torch.arange(
            used, dtype=torch.int32
        )
        seq_of_row += [s] * sp.n
        pos_of_row += range(sp.start, sp.start + sp.n)
    inv = inv.to(device, non_blocking=True)
    seq = torch.tensor(seq_of_row, dtype=torch.long).to(device, non_blocking=True)
    pos = torch.tensor(pos_of_row, dtype=torch.int32).to(device, non_blocking=True)
    bs = block_size

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's signature
        logical = inv[seq[q_idx], kv_idx // bs]
        return (logical >= 0) & (logical * bs + kv_idx % bs <= pos[q_idx])

    mask = create_block_mask(
        mask_mod, None, None, len(seq_of_row), cache_rows, device=device,
        BLOCK_SIZE=(Q_TILE, KV_TILE),
    )  # fmt: skip
    return FlexMask(mask)


def attention_fn(device: torch.device) -> Callable:
    """flex_attention compiled for an accelerator (its kernels exist only compiled), eager on
    the CPU (the reference implementation: for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return _eager(flex_attention)
    # dynamic left to the compiler: static at first, a dimension made dynamic once it changes
    # (the step's rows do). Its mask functions compile: on this CPU, compiled with static
    # shapes, the unit tests' masks passed; inductor's CPU template failed to build C++ for
    # them with dynamic=True (torch 2.13), which the CPU does not use.
    return torch.compile(flex_attention)


def _eager(fn: Callable) -> Callable:
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with warnings.catch_warnings():  # "called without torch.compile": intended here
            warnings.simplefilter("ignore", UserWarning)
            return fn(*args, **kwargs)

    return run


def attend(
    fn: Callable, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: FlexMask
) -> torch.Tensor:
    """q [T, heads, D] against a layer's cache keys/values [kv_heads, rows, D]: [T, heads, D]."""
    out = fn(
        q.transpose(0, 1)[None], keys[None], values[None],
        block_mask=mask.block_mask, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1)
