"""--compile-decode (model/compiled.py): a lone free decode runs one compiled graph over the
runner's own KV cache and gives transformers' logits; everything else keeps the eager path."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import native
from genserve.model.compiled import GemvTiming, LoneDecode, build_lone_decode, measure_gemv
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA
from tests.unit.test_hardware import fixed_policy, tiny_llama

FREE = SamplingParams()
CLOSE = dict(atol=1e-4, rtol=1e-4)
SEEDED = SamplingParams(seed=7)


def reference(m: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1]


def test_a_lone_decode_runs_compiled_and_matches_transformers() -> None:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()
    runner = LlamaRunner(m, 4, 64, batch_invariant=False, compile_decode=True)
    assert runner.compiled_decode == "compiling"
    # It compiles on a thread of its own while steps run eager (here in lane 3); its warm-up
    # writes only rows past the allocator's blocks, so the other lanes keep what they hold.
    for cache in (*runner.k_cache, *runner.v_cache):
        cache[:, : runner.cache_len] = 7.0
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    while runner.compiling.is_alive():
        runner.execute(StepInput((ChunkInput("w", 3, tuple(ids), 0, True, FREE, 0),)))
    runner.compiling.join()
    assert runner.compiled_decode == "ready" and runner.lone is not None
    lanes_0_to_2 = slice(0, 3 * runner.lane_len)
    assert all((c[:, lanes_0_to_2] == 7.0).all() for c in (*runner.k_cache, *runner.v_cache))
    assert (runner.k_cache[0][:, runner.cache_len :] != 0).any()  # the warm-up wrote there
    graphs = counters["stats"]["unique_graphs"]
    step = StepInput((ChunkInput("w", 3, (ids[0],), 9, True, FREE, 0),))  # compiled, lane 3
    torch.testing.assert_close(runner.execute(step)[0], reference(m, [*ids, ids[0]]), **CLOSE)
    calls = []
    compiled = runner.lone
    runner.lone = lambda *a: calls.append(a[-1]) or compiled(*a)  # counts compiled steps
    for slot in (2, 0):  # lane 0 too: its decodes start at cache row 0 (end == length)
        calls.clear()
        runner.execute(StepInput((ChunkInput("a", slot, tuple(ids[:6]), 0, True, FREE, 0),)))
        for start in range(6, 9):
            step = StepInput((ChunkInput("a", slot, (ids[start],), start, True, FREE, 0),))
            out = runner.execute(step)
            want = reference(m, ids[: start + 1])
            torch.testing.assert_close(out[0], want, atol=1e-4, rtol=1e-4)
        assert calls == [7, 8, 9]  # every decode compiled, attending its whole prefix
    # The graph compiled while building serves every lane and length: none compiled since.
    assert counters["stats"]["unique_graphs"] == graphs
    # A seeded row computes as it would batched: the eager path, and the same cache.
    step = StepInput((ChunkInput("a", 0, (5,), 9, True, SEEDED, 0),))
    out = runner.execute(step)
    torch.testing.assert_close(out[0], reference(m, [*ids, 5]), atol=1e-4, rtol=1e-4)
    assert calls == [7, 8, 9]


def shapes_of(m: LlamaForCausalLM) -> list[tuple[int, int]]:
    """The five weight shapes a lone decode multiplies by: qkv, o, gate_up, down, lm_head."""
    cfg, attn = m.config, m.model.layers[0].self_attn
    qkv = sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    return [
        (qkv, cfg.hidden_size),
        tuple(attn.o_proj.weight.shape),
        (2 * cfg.intermediate_size, cfg.hidden_size),
        tuple(m.model.layers[0].mlp.down_proj.weight.shape),
        tuple(m.lm_head.weight.shape),
    ]


def test_fused_one_row_products_compute_the_linear() -> None:
    """Every shape on the fused pass (compiled.fused_gemv): transformers' logits still (eager
    here; the compiled graph's forms are the test above's, as this machine measured them)."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()
    cfg = m.config
    shape = (cfg.num_key_value_heads, 16, cfg.hidden_size // cfg.num_attention_heads)
    caches = [[torch.zeros(shape) for _ in range(cfg.num_hidden_layers)] for _ in range(2)]
    module = LoneDecode(m, *caches, cfg.rms_norm_eps, forms=dict.fromkeys(shapes_of(m), "fused"))
    layer = module.layers[0]
    weights = [module.lm_head, layer.qkv, layer.o, layer.gate_up, layer.down]
    assert [w.form for w in weights] == ["fused"] * 5
    rotary, ids = m.model.rotary_emb, [3, 17, 42]
    with torch.inference_mode():
        for p, token in enumerate(ids):
            t, pos = torch.tensor([token]), torch.tensor([p])
            cos, sin = rotary(module.embed[t][None], pos[None])
            out = module(t, pos, cos[0], sin[0], p + 1, p + 1)  # end, length
    torch.testing.assert_close(out[0], reference(m, ids), atol=1e-4, rtol=1e-4)


def test_the_fused_pass_runs_only_where_it_measured_faster() -> None:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()
    timings = measure_gemv([(96, 64), (64, 64), (96, 64)], torch.float32)
    assert [(t.out_features, t.in_features) for t in timings] == [(96, 64), (64, 64)]
    assert all(t.fused_us >= 0 and t.library_us > 0 for t in timings)
    shapes = shapes_of(m)
    seen = []

    def measure(asked: list, dtype: torch.dtype) -> list[GemvTiming]:  # fixed times
        seen.append((list(asked), dtype))
        return [GemvTiming(o, i, 10.0 if k % 2 else 30.0, 20.0) for k, (o, i) in enumerate(asked)]

    module = build_lone_decode(m, [], [], m.config.rms_norm_eps, measure=measure)
    assert seen == [(shapes, torch.float32)]
    assert module.forms == {shapes[1]: "fused", shapes[3]: "fused"}
    assert (module.layers[0].o.form, module.layers[0].qkv.form) == ("fused", "linear")


@pytest.mark.parametrize(("quantization", "kind"), [("int8", "int8"), ("int8", "gemv")])
def test_the_policys_one_row_kernel_runs_in_the_compiled_decode(quantization, kind) -> None:
    """--compile-decode keeps the one-row kernel the runner's policy chose: torch's int8
    kernel, or genserve's gemv (a custom op in the graph; over the int8 weights where the
    runner quantizes), and the logits are the eager runner's."""
    if kind == "gemv" and native.library() is None:
        pytest.skip("no C compiler to build gemv.c")
    m = tiny_llama()
    policy = fixed_policy(m, torch.float32, quantization, kind)
    runner = LlamaRunner(m, 4, 64, batch_invariant=False, policy=policy, compile_decode=True)
    runner.native_decode = {}  # decode.c's path, where it measured faster, would come first
    runner.compiling.join()
    assert runner.compiled_decode == "ready"
    eager = LlamaRunner(m, 4, 64, batch_invariant=False, policy=policy)
    eager.native_decode = {}  # the policy's kernels, as the graph runs them
    assert set(runner.lone.forms.values()) == {kind} and len(runner.lone.forms) == 5
    if quantization == "int8":  # no dense copy held beside the int8
        assert runner.lone.layers[0].gate_up.weight is None
    calls = []
    compiled = runner.lone
    runner.lone = lambda *a: calls.append(a[-1]) or compiled(*a)
    ids = [5, 9, 14, 2, 7, 30, 11, 4]
    for r in (runner, eager):
        r.execute(StepInput((ChunkInput("a", 1, tuple(ids[:5]), 0, True, FREE, 0),)))
    for start in range(5, 8):
        step = StepInput((ChunkInput("a", 1, (ids[start],), start, True, FREE, 0),))
        torch.testing.assert_close(runner.execute(step), eager.execute(step), atol=1e-3, rtol=1e-3)
    assert calls == [6, 7, 8]
