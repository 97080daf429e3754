"""LlamaRunner over block tables: scattered blocks, blocks shared with another sequence (a
prefix-cache hit) and batched decodes all give transformers' logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import BlockCopy, ChunkInput, SamplingParams, StepInput
from genserve.model import native
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA

P = SamplingParams()


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()


def reference(m, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1]


def chunk(rid: str, blocks: tuple[int, ...], ids: list[int], start: int) -> ChunkInput:
    return ChunkInput(rid, 0, tuple(ids), start, True, P, 0, blocks=blocks)


def test_a_prefix_read_from_another_sequences_blocks_gives_the_same_logits() -> None:
    m = model()
    for invariant in (True, False):
        runner = LlamaRunner(m, 4, 128, batch_invariant=invariant, num_blocks=16, block_size=4)
        g = torch.Generator().manual_seed(1)
        prefix = torch.randint(0, 300, (12,), generator=g).tolist()
        a_tail, b_tail = [5, 6, 7], [9, 10]
        # a: blocks scattered over the pool; its first 3 blocks hold the shared prefix.
        a_blocks = (9, 2, 14, 7)
        out = runner.execute(StepInput((chunk("a", a_blocks, prefix + a_tail, 0),)))
        torch.testing.assert_close(out[0], reference(m, prefix + a_tail), atol=1e-4, rtol=1e-4)
        # b reuses a's 3 prefix blocks (a cache hit) and computes only its own tail, while a
        # decodes beside it in the same step.
        b_blocks = (9, 2, 14, 3)
        step = StepInput((chunk("b", b_blocks, b_tail, 12), chunk("a", a_blocks, [11], 15)))
        out = runner.execute(step)
        torch.testing.assert_close(out[0], reference(m, prefix + b_tail), atol=1e-4, rtol=1e-4)
        want_a = reference(m, prefix + a_tail + [11])
        torch.testing.assert_close(out[1], want_a, atol=1e-4, rtol=1e-4)
        # Both decode together (one batched call when not invariant), across a block boundary.
        step = StepInput((chunk("a", a_blocks + (0,), [12], 16), chunk("b", b_blocks, [13], 14)))
        out = runner.execute(step)
        want = [reference(m, prefix + a_tail + [11, 12]), reference(m, prefix + b_tail + [13])]
        torch.testing.assert_close(out, torch.stack(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "native"])
def test_decodes_read_in_place_from_their_lanes_beside_gathered_ones(attention: str) -> None:
    """4 slots over 16 blocks of 4: lane s is blocks 4s..4s+3. `a` runs in lane 0 and `c` in
    lane 2 (read as views, lane 1 idle between them), `b`'s blocks are scattered (gathered);
    all three decode in one step, then `a` and `c` again alone, and every logit is
    transformers'. A prompt chunk whose blocks are one run is read as a view too. The lanes
    are read by SDPA or by attend.c (whichever the runner measured faster serves)."""
    if attention == "native" and native.library() is None:
        pytest.skip("no C compiler to build attend.c")
    m = model()
    runner = LlamaRunner(m, 4, 16, batch_invariant=False, num_blocks=16, block_size=4)
    assert runner.lane_attention in ("sdpa", "native")  # as measured here
    runner.lane_attention = attention
    assert runner.lane_blocks == 4
    g = torch.Generator().manual_seed(2)
    prompts = {
        r: torch.randint(0, 300, (n,), generator=g).tolist()
        for r, n in zip("abc", (9, 6, 7), strict=True)
    }
    tables = {"a": (0, 1, 2), "b": (13, 6), "c": (8, 9)}
    step = StepInput(tuple(chunk(r, tables[r], prompts[r], 0) for r in "abc"))
    out = runner.execute(step)
    for j, r in enumerate("abc"):
        torch.testing.assert_close(out[j], reference(m, prompts[r]), atol=1e-4, rtol=1e-4)
    plan = runner._plan(
        StepInput(tuple(chunk(r, tables[r], [3], len(prompts[r])) for r in "abc")), None
    )
    assert plan.lanes is not None and plan.lanes.first == 0 and plan.lanes.span == 3
    assert plan.decode is not None and plan.decode.batch == 1  # b
    out = runner.execute(StepInput(tuple(chunk(r, tables[r], [3], len(prompts[r])) for r in "abc")))
    for j, r in enumerate("abc"):
        torch.testing.assert_close(out[j], reference(m, prompts[r] + [3]), atol=1e-4, rtol=1e-4)
    # a's next block (3) is still in its lane; c continues alone from lane 2 only.
    step = StepInput((chunk("a", (0, 1, 2, 3), [4], 10), chunk("c", (8, 9, 10), [4], 8)))
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, prompts["a"] + [3, 4]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], reference(m, prompts["c"] + [3, 4]), atol=1e-4, rtol=1e-4)
    # A later prompt chunk over one run of blocks (not from a lane's start) reads a view.
    later = runner._plan(StepInput((chunk("d", (5, 6, 7), [1, 2], 9),)), None)
    assert later.spans[0].run == 5 * 4 and later.spans[0].index is None


@pytest.mark.parametrize("attention", ["sdpa", "native"])
def test_a_lone_laned_decode_reads_its_lane_in_place(attention: str) -> None:
    """One stream: with SDPA reading the lanes, the decode is a span over its lane's view (one
    SDPA call, no lane batch); where attend.c reads them, a lane batch of one. Either way its
    logits are transformers'."""
    if attention == "native" and native.library() is None:
        pytest.skip("no C compiler to build attend.c")
    m = model()
    runner = LlamaRunner(m, 4, 16, batch_invariant=False, num_blocks=16, block_size=4)
    runner.lane_attention = attention
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    table = (4, 5, 6)  # lane 1, from its start
    runner.execute(StepInput((chunk("a", table, ids, 0),)))
    step = StepInput((chunk("a", table, [7], 9),))
    plan = runner._plan(step, None)
    assert plan.decode is None
    if attention == "sdpa":
        assert plan.lanes is None and len(plan.spans) == 1 and plan.spans[0].run == 4 * 4
    else:
        assert plan.lanes is not None and plan.lanes.first == 1 and plan.spans == ()
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, ids + [7]), atol=1e-4, rtol=1e-4)


def test_a_copied_partial_block_gives_the_same_logits_as_computing_it() -> None:
    """b continues a's 10 tokens (blocks of 4): a's two full blocks shared, the 2 tokens of
    a's third block copied into b's own block 5 by the step (BlockCopy), so b computes only
    its new tokens; its logits are transformers' over the whole prompt, and a's block is
    untouched (a decodes on from it)."""
    m = model()
    runner = LlamaRunner(m, 4, 64, batch_invariant=False, num_blocks=16, block_size=4)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 300, (10,), generator=g).tolist()
    runner.execute(StepInput((chunk("a", (0, 1, 2), prompt, 0),)))
    more = [7, 8, 9]
    step = StepInput(
        (chunk("b", (0, 1, 5, 6), more, 10), chunk("a", (0, 1, 2), [4], 10)),
        copies=(BlockCopy(2, 5, 2),),
    )
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, prompt + more), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], reference(m, prompt + [4]), atol=1e-4, rtol=1e-4)


def test_a_prefix_copied_into_a_lane_gives_the_same_logits_and_decodes_natively() -> None:
    """a computed its prompt in lane 0 (blocks 0..2 of 4); b shares its first 2 blocks,
    brought into the start of b's own lane 2 by one two-block copy (as KVCacheManager admits
    a prefix cached in another lane), so b computes only its tail. Its logits are
    transformers', a's blocks are untouched, and from then on b's blocks are one run: its
    decodes, beside a's, take decode.c's step where the runner measured it."""
    m = model()
    runner = LlamaRunner(m, 4, 16, batch_invariant=False, num_blocks=16, block_size=4)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 300, (11,), generator=g).tolist()
    runner.execute(StepInput((chunk("a", (0, 1, 2), prompt, 0),)))
    tail = [7, 8, 9]
    step = StepInput(
        (chunk("b", (8, 9, 10), tail, 8), chunk("a", (0, 1, 2), [4], 11)),
        copies=(BlockCopy(0, 8, 8, 2),),
    )
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, prompt[:8] + tail), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], reference(m, prompt + [4]), atol=1e-4, rtol=1e-4)
    decodes = StepInput((chunk("a", (0, 1, 2, 3), [5], 12), chunk("b", (8, 9, 10), [6], 11)))
    assert all(runner._free_decode_run(c) is not None for c in decodes.chunks)  # both one run
    out = runner.execute(decodes)
    torch.testing.assert_close(out[0], reference(m, prompt + [4, 5]), atol=1e-4, rtol=1e-4)
    want_b = reference(m, prompt[:8] + tail + [6])
    torch.testing.assert_close(out[1], want_b, atol=1e-4, rtol=1e-4)
