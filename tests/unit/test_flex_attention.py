"""The one-call-per-layer attention (model/flex.py), the runner's path on accelerators, run
here through FlexAttention's reference implementation: its mask, built from block tables,
gives transformers' logits for scattered blocks, blocks shared by two sequences, later prompt
chunks and batched decodes, and the same logits as the CPU's per-sequence path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import flex
from genserve.model.runner import LlamaRunner, _attention_kind
from tests.tiny_model import SMALL_LLAMA

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")
P = SamplingParams()
CLOSE = dict(atol=1e-4, rtol=1e-4)


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()


def reference(m: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1]


def chunk(rid: str, blocks: tuple[int, ...], ids: list[int], start: int) -> ChunkInput:
    return ChunkInput(rid, 0, tuple(ids), start, True, P, 0, blocks=blocks)


def runner(m: LlamaForCausalLM, attention: str) -> LlamaRunner:
    return LlamaRunner(
        m, 4, 128, batch_invariant=False, num_blocks=16, block_size=4, attention=attention
    )


def test_shared_and_scattered_blocks_chunks_and_decodes_give_transformers_logits() -> None:
    m = model()
    r = runner(m, "flex")
    assert r.attention == "flex"
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 300, (12,), generator=g).tolist()
    a_tail, b_tail = [5, 6, 7], [9, 10]
    a_blocks = (9, 2, 14, 7)  # scattered over the pool; the first 3 hold the shared prefix
    # a's prompt in two chunks: the second attends the first's cached rows and its own.
    out = r.execute(StepInput((chunk("a", a_blocks, prefix[:6], 0),)))
    torch.testing.assert_close(out[0], reference(m, prefix[:6]), **CLOSE)
    out = r.execute(StepInput((chunk("a", a_blocks, prefix[6:] + a_tail, 6),)))
    torch.testing.assert_close(out[0], reference(m, prefix + a_tail), **CLOSE)
    # b reuses a's 3 prefix blocks and computes its tail while a decodes, in one step.
    b_blocks = (9, 2, 14, 3)
    step = StepInput((chunk("b", b_blocks, b_tail, 12), chunk("a", a_blocks, [11], 15)))
    out = r.execute(step)
    torch.testing.assert_close(out[0], reference(m, prefix + b_tail), **CLOSE)
    torch.testing.assert_close(out[1], reference(m, prefix + a_tail + [11]), **CLOSE)
    # Both decode together, a across a block boundary into a new block.
    step = StepInput((chunk("a", a_blocks + (0,), [12], 16), chunk("b", b_blocks, [13], 14)))
    out = r.execute(step)
    want = [reference(m, prefix + a_tail + [11, 12]), reference(m, prefix + b_tail + [13])]
    torch.testing.assert_close(out, torch.stack(want), **CLOSE)


def test_a_mixed_step_gives_the_per_sequence_paths_logits() -> None:
    """Three sequences (one prompt chunk, two decodes, one of them in its lane) through the
    flex runner and the CPU's runner, on the same weights: the same logits."""
    m = model()
    flexed, plain = runner(m, "flex"), runner(m, "sdpa")
    assert plain.attention == "sdpa"
    g = torch.Generator().manual_seed(2)
    lengths = {"a": 9, "b": 6, "c": 7}
    prompts = {k: torch.randint(0, 300, (n,), generator=g).tolist() for k, n in lengths.items()}
    tables = {"a": (0, 1, 2), "b": (13, 6), "c": (8, 9, 10)}
    first = StepInput(tuple(chunk(k, tables[k], prompts[k], 0) for k in "ab"))
    for r in (flexed, plain):
        r.execute(first)
    step = StepInput((
        chunk("a", tables["a"], [3], 9), chunk("c", tables["c"], prompts["c"], 0),
        chunk("b", tables["b"], [4], 6),
    ))  # fmt: skip
    torch.testing.assert_close(flexed.execute(step), plain.execute(step), **CLOSE)


def test_the_mask_lets_a_row_see_exactly_its_own_positions() -> None:
    """Two sequences over 2-row blocks: the mask's function, asked row by row."""
    spans = [flex.FlexSpan((3, 0), 1, 2), flex.FlexSpan((1,), 0, 1)]  # rows 0-1: a; row 2: b
    mask = flex.StepMasks(2, 8, torch.device("cpu")).build(spans).block_mask
    seen = asked_row_by_row(mask, 3, 8)
    # a: block 3 holds positions 0-1 (cache rows 6-7), block 0 positions 2-3 (rows 0-1).
    # Row 0 is a's position 1, row 1 its position 2; row 2 is b's position 0 (block 1: row 2).
    want = torch.zeros(3, 8, dtype=torch.bool)
    want[0, [6, 7]] = True
    want[1, [6, 7, 0]] = True
    want[2, 2] = True
    assert torch.equal(seen, want)


def asked_row_by_row(mask, rows: int, cache_rows: int) -> torch.Tensor:  # noqa: ANN001
    seen = torch.zeros(rows, cache_rows, dtype=torch.bool)
    for q in range(rows):
        for kv in range(cache_rows):
            seen[q, kv] = bool(mask.mask_mod(0, 0, torch.tensor(q), torch.tensor(kv)))
    return seen


def test_a_step_forgets_the_blocks_of_the_step_before() -> None:
    """The block -> column map is kept between steps: a block the last step held and this
    one does not is invisible to every row, though the same column is in use again."""
    masks = flex.StepMasks(2, 8, torch.device("cpu"))
    masks.build([flex.FlexSpan((3,), 0, 2)])
    mask = masks.build([flex.FlexSpan((1,), 0, 2)]).block_mask
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[0, 2] = True
    want[1, [2, 3]] = True
    assert torch.equal(asked_row_by_row(mask, 2, 8), want)


def test_the_tiles_visited_are_the_tiles_a_dense_mask_would_keep() -> None:
    """The tile lists read off the block tables against create_block_mask's, which evaluates
    the mask at every (row, cache row) of the pool: the same tiles, each query tile's in cache
    order, for shared and scattered blocks, prompt chunks and decodes, and steps whose rows
    span several query tiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(3)
    bs, blocks = 16, 96  # 1536 cache rows: 12 KV tiles
    masks = flex.StepMasks(bs, bs * blocks, torch.device("cpu"))
    for _ in range(4):
        perm = torch.randperm(blocks, generator=g).tolist()
        spans, row = [], 0
        for _ in range(int(torch.randint(1, 12, (1,), generator=g))):
            n = int(torch.randint(1, 90, (1,), generator=g))  # a decode or a prompt chunk
            start = int(torch.randint(0, 40, (1,), generator=g))
            need = -(-(start + n) // bs)
            table = tuple(perm[:2]) + tuple(perm[row + 2 : row + need])  # first two shared
            spans.append(flex.FlexSpan(table[:need], start, n))
            row += need
        mask = masks.build(spans).block_mask
        rows = sum(sp.n for sp in spans)
        dense = create_block_mask(
            mask.mask_mod, None, None, rows, bs * blocks, device="cpu",
            BLOCK_SIZE=(flex.Q_TILE, flex.KV_TILE),
        )  # fmt: skip
        assert torch.equal(mask.to_dense(), dense.to_dense())
        for q in range(mask.kv_num_blocks.shape[-1]):
            listed = mask.kv_indices[0, 0, q, : mask.kv_num_blocks[0, 0, q]]
            assert torch.equal(listed, listed.sort().values)
        held = {b * bs // flex.KV_TILE for sp in spans for b in sp.table}
        assert int(mask.kv_num_blocks.max()) <= len(held)


def test_attention_kind_by_device() -> None:
    assert _attention_kind("auto", torch.device("cpu")) == "sdpa"
    assert _attention_kind("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="attention 'paged'"):
        _attention_kind("paged", torch.device("cpu"))


def test_a_flex_that_fails_to_build_leaves_the_runner_on_the_per_sequence_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner tries flex at load (a prompt tile and a decode); where its kernels do not
    build (an H200 refused inductor's default tiles for lack of shared memory), it says why
    and serves through the per-sequence path, with that path's logits."""

    def unbuildable(device: torch.device):  # noqa: ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource")

        return run

    m = model()
    want = runner(m, "sdpa").execute(StepInput((chunk("a", (3, 1), [5, 6, 7, 8, 9], 0),)))
    monkeypatch.setattr(flex, "attention_fn", unbuildable)
    r = runner(m, "flex")
    assert r.attention == "sdpa"
    assert "FlexAttention failed on cpu (No valid triton configs" in caplog.text
    got = r.execute(StepInput((chunk("a", (3, 1), [5, 6, 7, 8, 9], 0),)))
    torch.testing.assert_close(got, want, **CLOSE)


def test_a_flex_that_fails_inside_a_step_is_dropped_and_the_step_runs_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flex built at load but fails on a later shape (it recompiles as a step's rows change):
    that step is answered through the per-sequence path, with its logits, and so are the next
    ones; the runner says why once."""
    real = flex.attention_fn

    def fails_after_load(device: torch.device):  # noqa: ANN202
        fn, calls = real(device), [0]

        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] > 2:  # the load-time try: a prompt tile, then a decode
                raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource")
            return fn(*args, **kwargs)

        return run

    m = model()
    plain = runner(m, "sdpa")
    monkeypatch.setattr(flex, "attention_fn", fails_after_load)
    r = runner(m, "flex")
    assert r.attention == "flex"
    prompt = StepInput((chunk("a", (3, 1), [5, 6, 7, 8, 9], 0),))
    torch.testing.assert_close(r.execute(prompt), plain.execute(prompt), **CLOSE)
    assert r.attention == "sdpa"
    assert caplog.text.count("FlexAttention failed on cpu (No valid triton configs") == 1
    decode = StepInput((chunk("a", (3, 1), [10], 5),))
    torch.testing.assert_close(r.execute(decode), plain.execute(decode), **CLOSE)


def test_running_out_of_device_memory_in_a_step_keeps_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error is the device's, not flex's kernels': the step fails as it
    would on any path, and flex stays for the next one."""
    real = flex.attention_fn

    def out_of_memory_once(device: torch.device):  # noqa: ANN202
        fn, calls = real(device), [0]

        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] == 3:  # the first call after the load-time try
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22 GiB")
            return fn(*args, **kwargs)

        return run

    m = model()
    monkeypatch.setattr(flex, "attention_fn", out_of_memory_once)
    r = runner(m, "flex")
    prompt = StepInput((chunk("a", (3, 1), [5, 6, 7, 8, 9], 0),))
    with pytest.raises(torch.OutOfMemoryError):
        r.execute(prompt)
    assert r.attention == "flex"
    torch.testing.assert_close(r.execute(prompt)[0], reference(m, [5, 6, 7, 8, 9]), **CLOSE)


def engine_tokens(model_dir, data_dir, monkeypatch: pytest.MonkeyPatch, attention: str):  # noqa: ANN001, ANN201
    """Greedy tokens of three requests through a whole in-process engine (prefix cache on,
    16-token step budget so prompts run in chunks beside decodes; the third request shares
    the first one's prompt prefix, cached by then), its runner's attention forced."""
    import threading
    from dataclasses import replace

    from genserve.config import EngineConfig, ModelConfig, ServerConfig, StorageConfig
    from genserve.engine.types import Request, SamplingParams
    from genserve.model import runner as runner_mod
    from genserve.runtime.build import build_served_model

    monkeypatch.setattr(runner_mod, "_attention_kind", lambda asked, device: attention)
    cfg = replace(
        ServerConfig(),
        model=replace(ModelConfig(), ref=str(model_dir), embedding_model=None),
        engine=EngineConfig(
            max_batch_size=4, max_model_len=96, own_process=False, max_num_batched_tokens=16
        ),  # fmt: skip
        storage=replace(StorageConfig(), data_dir=str(data_dir)),
    )
    core = build_served_model(cfg).engine.core
    assert core.worker.runner.attention == attention
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    finished: set[str] = set()
    changed = threading.Condition()

    def publish(deltas) -> None:  # noqa: ANN001
        with changed:
            for d in deltas:
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
                cached[d.request_id] = max(cached.get(d.request_id, 0), d.cached_tokens)
                if d.finished:
                    finished.add(d.request_id)
            changed.notify_all()

    def wait_for(*ids: str) -> None:
        with changed:
            assert changed.wait_for(lambda: finished.issuperset(ids), timeout=120)

    core.publish = publish
    core.start()
    try:
        prefix = list(range(3, 40))  # 37 tokens: two full 16-token blocks to share
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        core.submit(Request("a", prefix + [41, 42], params))
        core.submit(Request("b", [44, 45, 46, 47, 48], params))
        wait_for("a", "b")
        core.submit(Request("c", prefix + [50], params))
        wait_for("c")
    finally:
        core.stop()
    assert cached.get("c", 0) >= 32  # its prompt's two full blocks came from the cache
    return tokens


def test_a_whole_engine_on_flex_gives_the_per_sequence_paths_tokens(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """The GPU's attention path end to end, on the CPU (flex's reference implementation):
    block tables from the engine's allocator, a prefix-cache hit, prompts in chunks beside
    decodes. Greedy tokens equal the CPU path's. (Untied embeddings: the shared tiny model's
    tied ones make it repeat its last token whatever it attends to.)"""
    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "model", tie_word_embeddings=False)
    want = engine_tokens(folder, tmp_path / "sdpa", monkeypatch, "sdpa")
    got = engine_tokens(folder, tmp_path / "flex", monkeypatch, "flex")
    assert got == want
    assert all(len(t) == 8 for t in got.values())
    assert any(len(set(t)) > 1 for t in got.values())  # tokens that depend on what came before


def random_steps(n: int, seed: int, bs: int, blocks: int) -> list[list[flex.FlexSpan]]:
    """Steps as a server makes them: lone decodes, prompt chunks, decodes beside prompts."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n):
        perm = torch.randperm(blocks, generator=g).tolist()
        spans, used = [], 0
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            size = 1 if torch.rand(1, generator=g) < 0.6 else int(torch.randint(2, 200, (1,)))
            start = int(torch.randint(0, 60, (1,), generator=g))
            need = -(-(start + size) // bs)
            spans.append(flex.FlexSpan(tuple(perm[used : used + need]), start, size))
            used += need
        steps.append(spans)
    return steps


def compiled_step(fn, masks: flex.StepMasks, spans, kv: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    q = torch.randn(sum(sp.n for sp in spans), 4, 16)
    return flex.attend(fn, q, kv, kv, masks.build(spans))


def test_compiled_flex_stops_recompiling_once_the_step_shapes_have_varied() -> None:
    """On a GPU flex runs compiled, and each new combination of shapes is another graph; past
    the compiler's limit it would run the dense reference over the whole pool (512 GiB asked
    for on an H200). The step's tensors are padded so that a handful of warm-up steps leave
    nothing to specialise: a run of varied steps afterwards compiles no graph. Checked with
    the compiler's "eager" backend (the same guards, no kernels)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    bs, blocks = 16, 96
    masks = flex.StepMasks(bs, bs * blocks, torch.device("cpu"))
    kv = torch.randn(2, bs * blocks, 16)
    fn = flex.compiled_flex("eager")
    at_load = [[flex.FlexSpan(tuple(range(8)), 0, flex.Q_TILE)], [flex.FlexSpan((0,), 0, 1)]]
    for spans in at_load + random_steps(8, 0, bs, blocks):  # the runner's _try_flex, then work
        compiled_step(fn, masks, spans, kv)
    warm = counters["stats"]["unique_graphs"]
    for spans in random_steps(20, 1, bs, blocks):
        compiled_step(fn, masks, spans, kv)
    assert counters["stats"]["unique_graphs"] == warm
    torch._dynamo.reset()


def test_compiled_flex_raises_at_the_recompile_limit_instead_of_running_the_reference() -> None:
    """Where the limit is reached anyway, the call raises (the runner then attends per
    sequence) rather than falling back to the uncompiled reference."""
    import torch._dynamo

    torch._dynamo.reset()
    bs, blocks = 16, 96
    masks = flex.StepMasks(bs, bs * blocks, torch.device("cpu"))
    kv = torch.randn(2, bs * blocks, 16)
    fn = flex.compiled_flex("eager")
    # config.patch, not monkeypatch: monkeypatch's undo deletes the config entry outright
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled_step(fn, masks, [flex.FlexSpan((0, 1), 0, 20)], kv)
        with pytest.raises(Exception, match="recompile"):
            compiled_step(fn, masks, [flex.FlexSpan((0, 1), 20, 1)], kv)
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # set for the call only
    assert torch._dynamo.config.recompile_limit == 64  # as compiled_flex left it
    torch._dynamo.reset()
