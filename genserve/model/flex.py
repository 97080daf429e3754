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
- The block-sparse form of the mask (tiles of KV_TILE cache rows), read off the block tables
  rather than evaluated over the pool, lets the kernel skip tiles that none of a query tile's
  sequences use (StepMasks).

In the compiled main kernel a query row's result should not depend on the rest of its batch:
its own tiles are always visited in cache order, and a tile it cannot see adds exact zeros and
leaves the running maximum unchanged (DESIGN rule 4 for the attention part; cuBLAS's linears
are another matter). That is why GPU_KERNEL_OPTIONS keeps flex-decoding out. Not yet seen to
hold on a GPU: bench/invariance_probe.py prints it there.

On the CPU it runs eagerly (torch's reference implementation, dense scores), which is how the
unit tests check its masks against transformers. That implementation is not batch-invariant
for decode rows (its matmuls pick kernels by row count: 2.4e-7 apart, invariance_probe).
Serving on the CPU keeps the runner's own path, which is measured faster there and is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

KV_TILE = 128  # cache rows per sparse tile: a multiple of the engine's block sizes (16 default)
Q_TILE = 128  # query rows per sparse tile
# The compiled kernel's own tiles (each divides the mask's tiles). Inductor's default for bf16
# with 64-dim heads on an H100/H200 (128 x 128, 3 stages) asked for 246784 bytes of shared
# memory with our mask function, over the chip's 232448, and refused to build (2026-12-04).
# BACKEND TRITON: the main kernel for every step. Under 128 query rows inductor would pick
# flex-decoding, which splits each row's keys over the chip in a number of parts chosen from
# the call's shape, so a row's sums would be added in an order that depends on its batch.
GPU_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "BACKEND": "TRITON"}
RECOMPILE_LIMIT = 64  # graphs of flex_attention kept (step shapes; see attention_fn)


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


class StepMasks:
    """Each step's mask, built in work proportional to the blocks the step reads, never to the
    pool: on a GPU the pool holds millions of rows (what --gpu-memory-fraction leaves), and
    create_block_mask's dense [rows, pool] evaluation asked for 22 GiB at a 512-row step.

    The tile lists come straight from the block tables (BlockMask.from_kv_blocks): a query
    tile visits, in cache order, the KV tiles that hold a block of one of its sequences. Inside
    those tiles the mask function decides row by row; it finds a cache block's column in this
    step's small table through `_column` [pool blocks], a device tensor kept between steps with
    -1 everywhere but the blocks this step holds (reset when the next step is built: the
    stream runs the previous step's kernels first).
    """

    def __init__(self, block_size: int, cache_rows: int, device: torch.device) -> None:
        self.block_size = block_size
        self.cache_rows = cache_rows
        self.device = device
        self._column = torch.full((-(-cache_rows // block_size),), -1, dtype=torch.int32,
                                  device=device)  # fmt: skip
        self._held: torch.Tensor | None = None  # the blocks whose column is set

    def build(self, spans: Sequence[FlexSpan]) -> FlexMask:
        """The step's mask: `inv` [sequences, blocks held] (a block's logical index in each
        sequence, -1 where the sequence does not hold it) and each query row's sequence and
        position, copied to the device once."""
        from torch.nn.attention.flex_attention import BlockMask

        bs = self.block_size
        used = [sp.table[: -(-(sp.start + sp.n) // bs)] for sp in spans]
        held = sorted({b for table in used for b in table})
        column = {b: j for j, b in enumerate(held)}
        # Padded so that no dimension the compiled kernel sees is 1 (the compiler keeps a
        # graph apart for each size-1 dimension) and the rows fill whole query tiles: fewer
        # graphs, and no read past a tensor where a tile runs over the step's last row.
        inv = torch.full((max(2, len(spans)), max(2, len(held))), -1, dtype=torch.int32)
        for s, table in enumerate(used):
            inv[s, [column[b] for b in table]] = torch.arange(len(table), dtype=torch.int32)
        seq = [s for s, sp in enumerate(spans) for _ in range(sp.n)]
        pos = [p for sp in spans for p in range(sp.start, sp.start + sp.n)]
        rows = len(seq)
        pad = -(-rows // Q_TILE) * Q_TILE - rows
        seq_d = torch.tensor(seq + [0] * pad, dtype=torch.long).to(self.device, non_blocking=True)
        pos_d = torch.tensor(pos + [-1] * pad, dtype=torch.int32).to(self.device, non_blocking=True)
        self._hold(torch.tensor(held, dtype=torch.long))
        inv_d = inv.to(self.device, non_blocking=True)
        col_d = self._column

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's signature
            col = col_d[kv_idx // bs]
            logical = inv_d[seq_d[q_idx], col.clamp(min=0)]
            return (col >= 0) & (logical >= 0) & (logical * bs + kv_idx % bs <= pos_d[q_idx])

        counts, indices = self._tiles(spans, used)
        mask = BlockMask.from_kv_blocks(
            counts.to(self.device), indices.to(self.device), BLOCK_SIZE=(Q_TILE, KV_TILE),
            mask_mod=mask_mod, seq_lengths=(rows, self.cache_rows),
        )  # fmt: skip
        return FlexMask(mask)

    def _hold(self, held: torch.Tensor) -> None:
        """Columns for this step's blocks; the previous step's set back to -1 first."""
        if self._held is not None:
            self._column.index_fill_(0, self._held, -1)
        held = held.to(self.device, non_blocking=True)
        self._column.index_copy_(0, held, torch.arange(len(held), dtype=torch.int32,
                                                       device=self.device))  # fmt: skip
        self._held = held

    def _tiles(
        self, spans: Sequence[FlexSpan], used: list[tuple[int, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query tile, the KV tiles its sequences' blocks lie in, ascending:
        ([1, 1, query tiles] counts, [1, 1, query tiles, pool tiles] indices, padded with 0)."""
        bs = self.block_size
        rows = sum(sp.n for sp in spans)
        per_tile: list[set[int]] = [set() for _ in range(-(-rows // Q_TILE))]
        row = 0
        for sp, table in zip(spans, used, strict=True):
            tiles = {
                t for b in table for t in range(b * bs // KV_TILE, (b * bs + bs - 1) // KV_TILE + 1)
            }
            for q in range(row // Q_TILE, (row + sp.n - 1) // Q_TILE + 1):
                per_tile[q] |= tiles
            row += sp.n
        # flex reads the indices' last dimension as the pool's tile count (one int32 a tile).
        indices = torch.zeros(
            (1, 1, len(per_tile), -(-self.cache_rows // KV_TILE)), dtype=torch.int32
        )
        for q, tiles in enumerate(per_tile):
            indices[0, 0, q, : len(tiles)] = torch.tensor(sorted(tiles), dtype=torch.int32)
        counts = torch.tensor([[[len(t) for t in per_tile]]], dtype=torch.int32)
        return counts, indices


def attention_fn(device: torch.device) -> Callable:
    """flex_attention compiled for an accelerator (its kernels exist only compiled), eager on
    the CPU (the reference implementation: for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return _eager(flex_attention)
    return compiled_flex()


def compiled_flex(backend: str = "inductor") -> Callable:
    """flex_attention through torch.compile (`backend` "eager" in tests: the same guards and
    recompiles, no kernels built). Dynamic shapes are left to the compiler: static at first, a
    dimension made dynamic once it changes (the step's rows do). On this CPU inductor's flex
    template built C++ for static shapes only (torch 2.13), which the CPU does not serve with."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, backend=backend)
    config = torch._dynamo.config
    # Each new combination of shapes compiles another graph. Past the compiler's limit (8 by
    # default) it would call flex_attention uncompiled: the reference implementation, whose
    # dense scores over a GPU's pool asked for 512 GiB (H200, 2026-12-04). So the limit is
    # raised, and reaching it raises (the runner then attends per sequence) instead.
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)

    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before = config.fail_on_recompile_limit_hit
        config.fail_on_recompile_limit_hit = True  # for this call only: 4 us, not a patch's 32
        try:
            return compiled(*args, kernel_options=GPU_KERNEL_OPTIONS, **kwargs)
        finally:
            config.fail_on_recompile_limit_hit = before

    return run


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
