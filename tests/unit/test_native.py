"""genserve's own CPU kernels (model/native.py). The row-by-row linear (gemv.c), built here
with the system's compiler, must compute what F.linear computes (on the int8 weights
dequantized, for int8), keep a row's bits whatever the other rows of the call, refuse what it
cannot multiply, and leave torch's kernels serving where it cannot be built. The lanes'
decode attention (attend.c) must compute SDPA's result."""

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.cli import SERVE_OPTIONS, build_config
from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import kernels, native
from genserve.model.hardware import ShapePlan, row_invariance
from genserve.model.runner import Linear, LlamaRunner
from tests.tiny_model import SMALL_LLAMA
from tests.unit.test_hardware import fixed_policy, seeded_logits, tiny_llama

needs_amx = pytest.mark.skipif(not native.amx_ready(), reason="no AMX tiles on this CPU")
needs_dp = pytest.mark.skipif(not native.dp_ready(), reason="no AVX512-BF16 on this CPU")
needs_vnni = pytest.mark.skipif(not native.vnni_ready(), reason="no AVX512-VNNI on this CPU")

FREE = SamplingParams()

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler to build gemv.c")

# Rows a decode step sends (1, a few), and weights whose widths are not multiples of the
# kernel's 4-row blocks or 16-wide vectors (the tails), next to a real model's.
SHAPES = [(1, 7, 40), (3, 960, 576), (9, 13, 100), (2, 5, 17), (1, 4, 16)]


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_dense_weights_match_float64(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = native.Gemv(w)(x)
    assert y.dtype == dtype and y.shape == (m, n)
    want = reference(x, w)
    # float32 sums in another order; bf16 rounds the result once (8 bits of mantissa)
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int8_weights_match_their_dequantized_product(
    dtype: torch.dtype, m: int, n: int, k: int
) -> None:
    g = torch.Generator().manual_seed(m + n * 7 + k)
    quant = kernels.quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g).to(dtype)
    y = native.Gemv(quant.q, quant.scales)(x)
    assert y.dtype == dtype
    want = reference(x, quant.dequantize(torch.float32))
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_a_rows_bits_do_not_depend_on_the_other_rows() -> None:
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        fn = native.Gemv(torch.randn(96, 64, generator=g).to(dtype))
        x = torch.randn(17, 64, generator=g).to(dtype)
        assert row_invariance(fn, x, [3, 8, 17]) == (True, True)
        assert torch.equal(fn(x[5:6])[0], fn(x)[5])  # the sixth row alone, as in 17


def test_no_rows_give_no_rows() -> None:
    """A step whose chunks all end mid-prompt asks the LM head for no rows: an empty x (no data
    pointer in float32) gives an empty y, in every weight format, not a failed step."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 32, generator=g)
    quant = kernels.quantize_int8(w)
    for fn in (native.Gemv(w), native.Gemv(w.bfloat16()), native.Gemv(quant.q, quant.scales)):
        for dtype in (torch.float32, torch.bfloat16):
            y = fn(torch.empty(0, 32, dtype=dtype), float_out=True)
            assert y.shape == (0, 24) and y.dtype == torch.float32


def test_through_kernels_build_with_a_bias_and_strided_input() -> None:
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    fn = kernels.build("gemv", w, b, None, 4)
    x = torch.randn(32, 3, generator=g).t()  # not contiguous
    assert torch.allclose(fn(x), F.linear(x, w, b), atol=1e-5)
    quant = kernels.quantize_int8(w)
    fn8 = kernels.build("gemv", None, b, quant, 4)  # reads the int8 weights only
    assert torch.allclose(fn8(x), F.linear(x, quant.dequantize(torch.float32), b), atol=1e-4)


def vnni_reference(x: torch.Tensor, quant: kernels.QuantizedWeight) -> torch.Tensor:
    """What gemv_i8_vnni computes, step by step in torch: each row of x (as float32) times
    32767 / its largest magnitude, rounded half to even to int16; the integer products summed
    exactly (int64); the sum times the row's step and the weight row's scale in float64,
    rounded to float32, then to x's dtype."""
    xf = x.float()
    top = xf.abs().amax(dim=1, keepdim=True)
    inv = torch.tensor(32767.0) / top  # float32 division, as the C code's
    q = torch.where(top > 0, torch.round(xf * inv), torch.zeros_like(xf)).to(torch.int64)
    sums = q @ quant.q.to(torch.int64).T
    step = top.double() / 32767.0
    y = (sums.double() * step * quant.scales.double()[None, :]).float()
    return y.to(x.dtype)


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (5, 6, 4100), (4, 9, 8300), (6, 33, 575)])
def test_vnni_int8_is_the_exact_integer_sum_of_int16_rows(dtype, m: int, n: int, k: int) -> None:
    """The VNNI kernel's result is exactly its definition (vnni_reference), bit for bit, for
    row counts across its 1-4 row groups, weights whose rows are not whole 4-row blocks or
    32-wide vectors, and inner widths past one int32 span (4096); and close to the float
    product of x and the dequantized weights (x's 16-bit rounding only)."""
    g = torch.Generator().manual_seed(m * 31 + n + k)
    quant = kernels.quantize_int8(torch.randn(n, k, generator=g))
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, 0] = 0.0
    y = native.Gemv(quant.q, quant.scales, vnni=True)(x)
    assert y.dtype == dtype and torch.equal(y, vnni_reference(x, quant))
    want = reference(x, quant.dequantize(torch.float32))
    tol = 1e-4 if dtype == torch.float32 else 2**-8
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_vnni
def test_vnni_int8_sums_the_largest_products_without_overflow() -> None:
    """Every |x| at its row's largest value and every weight at +-127, 8300 wide: each
    product is 32767 * 127, and the sum (8300 of them) is far past int32; it must come out
    exact, as its int64 definition."""
    k = 8300
    q = torch.full((8, k), 127, dtype=torch.int8)
    q[1] = -127
    quant = kernels.QuantizedWeight(q, torch.ones(8))
    x = torch.full((2, k), 2.0)
    y = native.Gemv(quant.q, quant.scales, vnni=True)(x)
    assert torch.equal(y, vnni_reference(x, quant))
    assert y[0, 0].item() == pytest.approx(2.0 * 127 * k, rel=1e-6)
    assert y[0, 1].item() == pytest.approx(-2.0 * 127 * k, rel=1e-6)


@needs_vnni
def test_vnni_rows_keep_their_bits_and_rows_not_finite_take_the_float_path() -> None:
    """A row's bits do not depend on the others (integer sums); a row with a NaN or an inf has
    no int16 step and gets the float path's result, leaving its neighbours' bits alone; a row
    of zeros gives zeros."""
    g = torch.Generator().manual_seed(11)
    quant = kernels.quantize_int8(torch.randn(40, 96, generator=g))
    fn = native.Gemv(quant.q, quant.scales, vnni=True)
    plain = native.Gemv(quant.q, quant.scales)
    x = torch.randn(9, 96, generator=g)
    assert row_invariance(fn, x, [3, 5, 8, 9]) == (True, True)
    bad = x.clone()
    bad[2, 5], bad[6, 1], bad[7] = float("nan"), float("inf"), 0.0
    y = fn(bad)
    assert torch.equal(y[2].isnan(), plain(bad[2:3])[0].isnan()) and y[2].isnan().all()
    torch.testing.assert_close(y[6], plain(bad[6:7])[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y[7], torch.zeros(40))
    for i in (0, 1, 3, 4, 5, 8):
        assert torch.equal(y[i], fn(x[i : i + 1])[0])


def test_vnni_is_an_int8_candidate_where_the_cpu_has_it() -> None:
    cpu = torch.device("cpu")
    assert ("vnni" in kernels.available(torch.bfloat16, cpu, "int8")) == native.vnni_ready()
    assert "vnni" not in kernels.available(torch.bfloat16, cpu, "none")
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="quantized"):
        kernels.build("vnni", w, None, None, 1)
    if native.vnni_ready():
        with pytest.raises(ValueError, match="int8"):
            native.Gemv(w, None, vnni=True)


def test_it_is_a_candidate_for_the_compute_dtypes_it_takes() -> None:
    cpu = torch.device("cpu")
    assert "gemv" in kernels.available(torch.bfloat16, cpu, "none")
    assert "gemv" in kernels.available(torch.float32, cpu, "int8")
    assert "gemv" not in kernels.available(torch.float16, cpu, "none")


def test_bad_operands_are_refused_not_read_out_of_bounds() -> None:
    fn = native.Gemv(torch.randn(8, 16))
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 15))  # the wrong width would read past x's rows
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="one scale per output row"):
        native.Gemv(torch.zeros(8, 16, dtype=torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match="unavailable"):
        native.Gemv(torch.randn(8, 16, dtype=torch.float16))


NO_COMPILER = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from genserve.model import hardware, kernels, native
assert native.library() is None
assert "gemv" not in kernels.available(torch.bfloat16, torch.device("cpu"), "int8")
p = hardware.measure_policy([hardware.ShapeSpec(64, 32, 8)], torch.float32, "int8",
                            torch.device("cpu"), 8, 4)
assert "gemv" not in p.plans[0].times_us, p.plans[0].times_us
from transformers import LlamaConfig, LlamaForCausalLM
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA
runner = LlamaRunner(LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)), 4, 64, batch_invariant=False)
assert runner.lane_attention == "sdpa"  # attend.c is not there either
print("OK")
"""


def test_without_a_compiler_torchs_kernels_serve(tmp_path) -> None:  # noqa: ANN001
    env = {"PATH": str(tmp_path), "CC": "no-such-cc", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True,
        timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
    assert "no C compiler" in done.stderr


def test_a_compile_error_is_reported_and_nothing_half_built_is_loaded(tmp_path) -> None:  # noqa: ANN001
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: this compiler is broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    code = "import logging, torch\nlogging.basicConfig()\nfrom genserve.model import native\n"
    code += "assert native.library() is None\nprint('OK')\n"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
    assert "this compiler is broken" in done.stderr
    assert not list((tmp_path / "genserve").glob("*.so"))


NO_AVX512 = """
import torch, torch.nn.functional as F
from genserve.model import kernels, native
assert native.library() is not None and not native.amx_ready()
w = torch.randn(24, 40)
quant = kernels.quantize_int8(w)
for fn, ref in ((native.Gemv(w), w), (native.Gemv(w.bfloat16()), w.bfloat16().float()),
                (native.Gemv(quant.q, quant.scales), quant.dequantize(torch.float32))):
    x = torch.randn(3, 40)
    torch.testing.assert_close(fn(x, float_out=True), F.linear(x, ref), atol=1e-4, rtol=1e-4)
print("OK")
"""


def test_a_cpu_without_avx512_builds_and_runs_the_kernels(tmp_path) -> None:  # noqa: ANN001
    """The plain loops are what an AVX2-only CPU compiles (gemv.c once named its AVX-512 read-
    ahead there and the whole library failed to build): here the system's compiler, told to
    target x86-64-v3 instead of this CPU, builds it, AMX is not offered, and gemv computes."""
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None or platform.machine() != "x86_64":
        pytest.skip("needs an x86-64 C compiler")
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\nexec {real} $(echo "$@" | sed s/-march=native/-march=x86-64-v3/)\n')
    cc.chmod(0o755)
    env = dict(os.environ, CC=str(cc), XDG_CACHE_HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", NO_AVX512], env=env, capture_output=True, text=True, timeout=300,
        check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
    assert list((tmp_path / "genserve").glob("native-*.so"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_seeded_sequence_is_bitwise_the_same_alone_or_batched_on_gemv(dtype) -> None:
    """With gemv as the invariant kernel, a seeded row's logits are the same bits alone or
    beside others (prompts of other lengths in the same steps), in bf16 too, where oneDNN's
    and F.linear's bf16 kernels are not (test_hardware's xfail)."""
    model = tiny_llama(dtype)
    policy = fixed_policy(model, dtype, "none", "gemv")
    alone = seeded_logits(model, policy, batched=False)
    together = seeded_logits(model, policy, batched=True)
    assert [torch.equal(a, b) for a, b in zip(alone, together, strict=True)] == [True] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("kv", "heads", "dim"),
    [(3, 9, 64), (2, 4, 128), (1, 12, 32)],  # the last: no fixed copy (group 12, 32 dims)
)
def test_lane_attention_matches_sdpa_over_each_lanes_own_length(dtype, kv, heads, dim) -> None:
    """Rows in lanes of a cache [kv, lanes * lane_len, D], each attending its own number of
    positions, against SDPA on those positions. 40 rows, many shorter than the threads'
    read-ahead (attend.c's AHEAD), so it runs across tasks; lane 0, 3, 1 first as before."""
    g = torch.Generator().manual_seed(6)
    lane, rows = 40, 40
    keys = torch.randn(kv, rows * lane + 8, dim, generator=g).to(dtype)
    values = torch.randn(kv, rows * lane + 8, dim, generator=g).to(dtype)
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    rest = [i for i in range(rows) if i not in (0, 3, 1)]
    lanes = torch.tensor([0, 3, 1, *rest], dtype=torch.int32)
    lengths = torch.tensor([1, 40, 17], dtype=torch.int32)
    lengths = torch.cat([lengths, torch.randint(1, lane + 1, (rows - 3,), generator=g)]).int()
    out = native.attend_lanes(q, keys, values, lanes, lengths, 8, lane)  # lanes from row 8
    for j in range(rows):
        lo = 8 + int(lanes[j]) * lane
        k = keys[:, lo : lo + int(lengths[j])].float()
        v = values[:, lo : lo + int(lengths[j])].float()
        want = F.scaled_dot_product_attention(
            q[j].float().view(kv, heads // kv, dim), k, v
        ).reshape(heads, dim)
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(out[j].float(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="cache of"):  # a lane past the cache's rows
        native.attend_lanes(q, keys, values, lanes + 1, lengths, 8, lane)
    with pytest.raises(ValueError, match="int32"):
        native.attend_lanes(q, keys, values, lanes.long(), lengths, 8, lane)


def test_lane_attention_is_the_same_bits_for_a_row_alone_or_among_others() -> None:
    """A task's result does not depend on which thread ran it or what it read ahead."""
    g = torch.Generator().manual_seed(7)
    kv, heads, dim, lane, rows = 3, 9, 64, 64, 24
    keys = torch.randn(kv, rows * lane, dim, generator=g).bfloat16()
    values = torch.randn(kv, rows * lane, dim, generator=g).bfloat16()
    q = torch.randn(rows, heads, dim, generator=g).bfloat16()
    lanes = torch.arange(rows, dtype=torch.int32)
    lengths = torch.randint(1, lane + 1, (rows,), generator=g).int()
    together = native.attend_lanes(q, keys, values, lanes, lengths, 0, lane)
    for j in (0, 5, rows - 1):
        alone = native.attend_lanes(q[j : j + 1], keys, values, lanes[j : j + 1],
                                    lengths[j : j + 1], 0, lane)  # fmt: skip
        assert torch.equal(alone[0], together[j])


class CountingPath:
    """One of a runner's decode.c paths that counts the steps it takes."""

    def __init__(self, path) -> None:  # noqa: ANN001
        self.path, self.rows = path, []

    def __call__(self, rows: native.DecodeStep, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.path(rows, x)


def native_and_eager(
    model, dtype: torch.dtype, quantization: str, path: str = "stack", policy=None
):  # noqa: ANN001, ANN201
    """Two runners on one model and policy (gemv everywhere unless given): one sends every free
    decode through decode.c's `path` (every layer in C, or torch's linears with C between
    them), the other none."""
    policy = policy or fixed_policy(model, dtype, quantization, "gemv")
    fast = LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy)
    eager = LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy)
    assert fast.native_stack is not None and fast.native_glue is not None
    chosen = fast._through_stack if path == "stack" else fast._through_glue
    counting = CountingPath(chosen)
    fast.native_decode, eager.native_decode = dict.fromkeys((0, 1, 2), counting), {}
    return fast, eager, counting


@pytest.mark.parametrize("path", ["stack", "glue"])
@pytest.mark.parametrize(
    ("dtype", "quantization", "bias", "tol"),
    [
        (torch.float32, "none", False, 1e-4),
        (torch.float32, "int8", True, 1e-4),
        (torch.bfloat16, "none", True, 0.05),
        (torch.bfloat16, "int8", False, 0.05),
    ],
)
def test_native_decode_computes_the_eager_paths_logits(
    dtype, quantization, bias, tol, path
) -> None:
    """One and three free decodes a step through decode.c (every layer in C, or its stages
    around the policy's linears), against the eager path on the same weights and kernels
    (q/k/v/o biases too), with a 4-query-head-over-2 model; the keys and values it writes are
    what the eager path reads next: the steps alternate between the two paths in one runner
    and stay close to an eager runner's."""
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256, attention_bias=bias)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(dtype)
    check_native_decode(*native_and_eager(model, dtype, quantization, path), tol)


@needs_vnni
@pytest.mark.parametrize("path", ["stack", "glue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_on_vnni_int8_computes_the_eager_paths_logits(dtype, path) -> None:
    """Where the policy runs the VNNI kernel for a few rows, decode.c's stack reads the int8
    weights through it too (format 3), and its logits stay close to the eager path's."""
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256, attention_bias=True)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(dtype)
    policy = fixed_policy(model, dtype, "int8", "vnni")
    fast, eager, counting = native_and_eager(model, dtype, "int8", path, policy=policy)
    assert all(lin.few.vnni for lin in (fast.layers[0].qkv, fast.layers[0].down))
    check_native_decode(fast, eager, counting, 1e-3 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize(
    ("quantization", "bias", "kind", "lone"),
    [
        pytest.param("none", True, "amx", "gemv", marks=needs_amx),
        pytest.param("int8", False, "amx", "gemv", marks=needs_amx),
        pytest.param("none", False, "amx", "amx", marks=needs_amx),
        pytest.param("none", True, "dp", "gemv", marks=needs_dp),
        pytest.param("int8", False, "dp", "gemv", marks=needs_dp),
        pytest.param("none", False, "dp", "dp", marks=needs_dp),
        pytest.param("none", True, "amx", "dp", marks=(needs_amx, needs_dp)),
    ],
)
def test_the_stack_multiplies_a_batch_through_packed_weights_as_the_eager_path(
    quantization, bias, kind, lone
) -> None:
    """With amx (or dp) chosen from two rows up (gemv for one), decode.c's stack runs a lone
    decode on gemv and three decodes on amx.c's tiles (or dp.c's dot products): both close to
    the eager path on the same policy. With it for every row count, no gemv is built and the
    stack runs both on the packed weight. With dp for one row and amx from two (the AMX
    Xeon's choice), the lone decode runs on dp.c's packed weight."""
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256, attention_bias=bias)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(torch.bfloat16)
    policy = fixed_policy(model, torch.bfloat16, quantization, "gemv")
    plans = tuple(
        replace(p, choices=(lone, kind, kind, kind), invariant=kind)
        if p.out_features % 16 == 0
        else p
        for p in policy.plans
    )  # the 300-token LM head is not whole tiles: gemv
    fast, eager, counting = native_and_eager(
        model, torch.bfloat16, quantization, policy=replace(policy, plans=plans)
    )
    layer = fast.layers[0]
    lins = (layer.qkv, layer.o, layer.gate_up, layer.down)
    first = 2 if lone != kind else 1
    assert [lin.tiles[1] for lin in lins] == [first] * 4
    few = {"gemv": native.Gemv, "dp": native.Dp, "amx": type(None)}[lone]
    assert all(type(lin.few) is few for lin in lins)
    if kind == "amx":
        assert layer.gate_up.tiles[0].glu  # SiLU(gate) * up straight from the tiles
    check_native_decode(fast, eager, counting, 0.05)


def check_native_decode(fast, eager, counting, tol: float) -> None:  # noqa: ANN001
    """Prompts in three slots, then six decode steps (one row, three, three, ...) through both
    runners, the fifth eager in `fast` too: every step's logits close."""
    g = torch.Generator().manual_seed(3)
    prompts = {slot: torch.randint(0, 300, (n,), generator=g).tolist() for slot, n in
               ((0, 5), (2, 11), (3, 1))}  # fmt: skip
    with torch.inference_mode():
        for runner in (fast, eager):
            for slot, ids in prompts.items():
                runner.execute(StepInput((ChunkInput("p", slot, tuple(ids), 0, True, FREE, 0),)))
        length = {slot: len(ids) for slot, ids in prompts.items()}
        for i in range(6):
            slots = (2,) if i % 3 == 0 else (0, 2, 3)  # one row, then three rows
            step = StepInput(tuple(
                ChunkInput(f"d{s}", s, (7 + i,), length[s], True, FREE, 1) for s in slots
            ))  # fmt: skip
            if i == 4:  # this one eager in the fast runner: it reads what decode.c wrote
                fast.native_decode = {}
            got, want = fast.execute(step), eager.execute(step)
            fast.native_decode = dict.fromkeys((0, 1, 2), counting)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            for s in slots:
                length[s] += 1
    assert counting.rows == [1, 3, 3, 1, 3]  # the other step ran eager


def test_only_free_single_token_decodes_in_one_run_take_native_decode() -> None:
    """A seeded row (its bits must not depend on its batch's path), a prompt chunk beside a
    decode and a row whose blocks are not one run keep the eager path; free decodes alone
    take decode.c, one or several a step. (Rows under LoRA adapters take it too:
    test_lora.py.)"""
    model = tiny_llama()
    fast, _, counting = native_and_eager(model, torch.float32, "none")
    bs = fast.block_size
    with torch.inference_mode():
        for slot in range(3):
            prompt = tuple(range(1, bs + 3))
            fast.execute(StepInput((ChunkInput("p", slot, prompt, 0, True, FREE, 0),)))

        def decode(slot: int, **kw) -> ChunkInput:  # noqa: ANN003
            return replace(ChunkInput("d", slot, (4,), bs + 2, True, FREE, 1), **kw)

        table = fast._table_of_lane(0)
        eager_steps = [
            (decode(0, params=SamplingParams(seed=5)),),
            (decode(0), ChunkInput("q", 1, (5, 6), bs + 2, True, FREE, 0)),
            (decode(0, blocks=(table[1], table[0])),),  # positions bs.. before 0..bs-1
        ]
        for chunks in eager_steps:
            fast.execute(StepInput(chunks))
        assert counting.rows == []
        fast.execute(StepInput((decode(0), decode(2))))
        fast.execute(StepInput((decode(1, start=bs + 3),)))
    assert counting.rows == [2, 1]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_prompt_chunks_through_the_glue_compute_the_torch_paths_logits(dtype, tol) -> None:
    """Free steps with prompt chunks (a whole prompt, a later chunk of one, a chunk beside a
    decode) run decode.c's row-wise stages around torch's linears and attention: their
    logits and the keys and values they cache stay close to torch's own ops'."""
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(dtype)
    policy = fixed_policy(model, dtype, "none", "linear")
    glued = LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy)
    plain = LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy)
    assert glued.native_glue is not None
    plain.native_glue, plain.native_decode, glued.native_decode = None, {}, {}
    calls = []
    through = glued._glued_prompt
    glued._glued_prompt = lambda *a: calls.append(a[0].shape[0]) or through(*a)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (40,), generator=g).tolist()
    steps = [
        (ChunkInput("a", 0, tuple(ids[:24]), 0, True, FREE, 0),),
        (ChunkInput("a", 0, tuple(ids[24:]), 24, True, FREE, 0),),
        (
            ChunkInput("a", 0, (5,), 40, True, FREE, 1),
            ChunkInput("b", 1, tuple(ids[:30]), 0, True, SamplingParams(prompt_logprobs=0), 0),
        ),
    ]
    with torch.inference_mode():
        for chunks in steps:
            got, want = glued.execute(StepInput(chunks)), plain.execute(StepInput(chunks))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert calls == [24, 16, 31]
    for mine, theirs in zip(
        glued.k_cache + glued.v_cache, plain.k_cache + plain.v_cache, strict=True
    ):
        torch.testing.assert_close(mine, theirs, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_glue_bits_do_not_depend_on_how_many_rows_share_the_call(dtype) -> None:
    """The row-wise stages run on every thread from some rows up: each row is still computed
    whole by one thread, so its bits are the same in a call of 300 rows as alone."""
    shape = native.DecodeShape(64, 4, 2, 16, 96, 1e-5, dtype)
    glue = native.DecodeGlue(shape, 512)
    g = torch.Generator().manual_seed(2)
    n = 300  # past decode.c's threshold for threads
    x, y = (torch.randn(n, 64, generator=g).to(dtype) for _ in range(2))
    w, gu = torch.randn(64, generator=g).to(dtype), torch.randn(n, 192, generator=g).to(dtype)
    cos, sin = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    qkv = torch.randn(n, 128, generator=g).to(dtype)
    write = torch.randperm(512, generator=g)[:n]

    def stages(rows: slice) -> tuple[torch.Tensor, ...]:
        m = rows.stop - rows.start
        st = glue.rows(m, cos[rows].contiguous(), sin[rows].contiguous(), write[rows])
        xs, h, act, q = x[rows].clone(), torch.empty(m, 64, dtype=dtype), None, qkv[rows].clone()
        glue.residual_norm(st, xs, y[rows].contiguous(), w, h)
        act = torch.empty(m, 96, dtype=dtype)
        glue.silu_mul(st, gu[rows].contiguous(), act)
        k, v = torch.zeros(2, 512, 16, dtype=dtype), torch.zeros(2, 512, 16, dtype=dtype)
        glue.rotate_write(st, k, v, q)
        return xs, h, act, q, k[:, write[rows]], v[:, write[rows]]

    together = stages(slice(0, n))
    alone = [stages(slice(j, j + 1)) for j in range(0, n, 37)]
    for j, one in zip(range(0, n, 37), alone, strict=True):
        for all_rows, single in zip(together, one, strict=True):
            row = all_rows[:, j] if all_rows.dim() == 3 else all_rows[j]
            assert torch.equal(row, single[:, 0] if single.dim() == 3 else single[0])
    with pytest.raises(ValueError, match="rotary tables"):
        glue.rotate_write(glue.rows(n), torch.zeros(2, 512, 16, dtype=dtype),
                          torch.zeros(2, 512, 16, dtype=dtype), qkv)  # fmt: skip
    with pytest.raises(ValueError, match="write row"):
        glue.rows(1, cos[:1], sin[:1], torch.tensor([512]))
    with pytest.raises(ValueError, match="another cache"):
        other = native.DecodeGlue(shape, 256).rows(1, cos[:1], sin[:1], torch.tensor([0]))
        glue.rotate_write(other, torch.zeros(2, 512, 16, dtype=dtype),
                          torch.zeros(2, 512, 16, dtype=dtype), qkv[:1].clone())  # fmt: skip
    with pytest.raises(ValueError, match="positions"):
        glue.attend(glue.rows(1), torch.zeros(2, 512, 16, dtype=dtype),
                    torch.zeros(2, 512, 16, dtype=dtype), qkv[:1].clone(),
                    torch.empty(1, 64, dtype=dtype), torch.empty(1, 64, dtype=dtype))  # fmt: skip


def test_decode_c_refuses_rows_that_would_read_or_write_outside_its_buffers() -> None:
    model = tiny_llama()
    fast, _, _ = native_and_eager(model, torch.float32, "none")
    shape, rows = fast.native_shape, fast.cache_rows
    cos = sin = torch.zeros(1, 32)

    def step(*args, c=cos) -> native.DecodeStep:  # noqa: ANN001, ANN002
        return native.DecodeStep(shape, rows, c, sin, *args)

    with pytest.raises(ValueError, match="outside its cache"):
        step([0], [rows - 2], [3])
    with pytest.raises(ValueError, match="write row"):
        step([rows], [0], [1])
    with pytest.raises(ValueError, match="rotary"):
        step([0], [0], [1], c=cos.double())
    with pytest.raises(ValueError, match="one write row"):
        step([0], [0, 1], [1])
    ok, x = step([0], [0], [1]), torch.zeros(1, 128)
    with pytest.raises(ValueError, match="x"):
        fast.native_stack(ok, x.bfloat16())
    with pytest.raises(ValueError, match="x"):
        fast.native_stack(ok, torch.zeros(2, 128))  # more rows than the step's
    glue = fast.native_glue
    with pytest.raises(ValueError, match="act"):
        glue.silu_mul(ok, torch.zeros(1, 512), torch.zeros(1, 128))
    with pytest.raises(ValueError, match="norm weight"):
        glue.norm(ok, x, torch.ones(64), torch.zeros(1, 128))
    with pytest.raises(ValueError, match="cache"):
        q = torch.zeros(1, 128)
        glue.attend(ok, fast.k_cache[0][:, :8], fast.v_cache[0], torch.zeros(1, 256), q, q)


def test_switched_off_no_native_kernel_is_offered_measured_or_run() -> None:
    """--no-native-kernels (an operator's way out): the option reaches the engine's config,
    and with the switch off no gemv candidate, lane attention or decode.c stack exists, so
    torch's kernels serve alone; switched on again, they are back."""
    defaults = {o.name: o.default for o in SERVE_OPTIONS}
    assert build_config(defaults | {"native_kernels": False}).engine.native_kernels is False
    assert build_config(defaults).engine.native_kernels is True
    model = tiny_llama()
    policy = fixed_policy(model, torch.float32, "none", "linear")  # gemv rides on its weights
    native.set_enabled(False)
    try:
        assert native.library() is None
        assert "gemv" not in kernels.available(torch.bfloat16, torch.device("cpu"), "int8")
        runner = LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy)
        assert runner.native_stack is None and runner.native_decode == {}
        assert runner.lane_attention == "sdpa"
    finally:
        native.set_enabled(True)
    assert native.library() is not None
    assert "gemv" in kernels.available(torch.bfloat16, torch.device("cpu"), "int8")
    assert LlamaRunner(model, 4, 64, batch_invariant=False, policy=policy).native_stack is not None
    # --deterministic: no row is free to take decode.c, so none is built or timed
    strict = LlamaRunner(model, 4, 64, batch_invariant=True, policy=policy)
    assert strict.native_stack is None and strict.native_glue is None


# -- amx.c: the AMX-tile bf16 linear -----------------------------------------------------------

# Rows: one, a tile's worth, past one tile and past a 32-row block, a prefill-like run; columns:
# one 16-wide block, an odd number of blocks (the last pair single), a real qkv projection.
AMX_SHAPES = [(1, 16, 32), (5, 48, 64), (16, 960, 576), (17, 48, 96), (33, 32, 64), (70, 64, 128)]


@needs_amx
@pytest.mark.parametrize(("m", "n", "k"), AMX_SHAPES)
def test_amx_matches_float64_and_keeps_each_rows_bits(m: int, n: int, k: int) -> None:
    _, x, fn, y = packed_linear_against_float64("amx", m, n, k)
    for i in {0, m // 2, m - 1}:  # a row alone: the same bits as among the m
        assert torch.equal(fn(x[i : i + 1])[0], y[i])


def packed_linear_against_float64(kind: str, m: int, n: int, k: int):  # noqa: ANN201
    """`kind`'s bf16 linear (with a bias) on random [m, k] rows of a [n, k] weight, checked
    against float64: (w, x, the kernel, its output)."""
    g = torch.Generator().manual_seed(m * 31 + n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    fn = kernels.build(kind, w, bias, None, m)
    y = fn(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want = F.linear(x.double(), w.double(), bias.double())
    # bf16 products summed in float32, the result rounded once to bf16 (and the bias added)
    assert torch.allclose(y.double(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    return w, x, fn, y


@needs_amx
def test_amx_is_a_bf16_candidate_and_refuses_what_it_cannot_multiply() -> None:
    cpu = torch.device("cpu")
    assert "amx" in kernels.available(torch.bfloat16, cpu, "int8")  # on the dequantized weight
    assert "amx" not in kernels.available(torch.float32, cpu, "none")
    with pytest.raises(ValueError, match=r"\[16n, 32k\]"):
        native.Amx(torch.randn(24, 64).bfloat16())  # 24 outputs: not whole 16-column tiles
    with pytest.raises(ValueError, match=r"\[16n, 32k\]"):
        native.Amx(torch.randn(16, 40).bfloat16())
    with pytest.raises(ValueError, match="unavailable"):
        native.Amx(torch.randn(16, 32))
    fn = native.Amx(torch.randn(16, 64).bfloat16())
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 32).bfloat16())  # the wrong width would read past x's rows
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 64))


# -- dp.c: the AVX512-BF16 bf16 linear ----------------------------------------------------------
# Rows: one, a group's worth (6) and past it, past several groups; columns: one 16-wide block,
# a panel and a block (4 + 1), a real qkv projection; k: an even number short of a vector.
DP_SHAPES = [(1, 16, 32), (6, 80, 66), (7, 48, 64), (17, 960, 576), (33, 32, 2), (70, 64, 128)]


@needs_dp
@pytest.mark.parametrize(("m", "n", "k"), DP_SHAPES)
def test_dp_matches_float64_and_keeps_each_rows_bits(m: int, n: int, k: int) -> None:
    w, x, fn, y = packed_linear_against_float64("dp", m, n, k)
    sums = native.Dp(w)(x, float_out=True)  # float32 sums as they are: far closer
    err = (sums.double() - F.linear(x.double(), w.double())).abs().max().item()
    assert sums.dtype == torch.float32 and err < 1e-4 * max(1.0, k**0.5)
    for i in {0, m // 2, m - 1}:  # a row alone, and among others: the same bits as among the m
        assert torch.equal(fn(x[i : i + 1])[0], y[i])
        assert torch.equal(fn(x[max(0, i - 3) : i + 1])[-1], y[i])


@needs_dp
def test_dp_is_a_bf16_candidate_and_refuses_what_it_cannot_multiply() -> None:
    cpu = torch.device("cpu")
    assert "dp" in kernels.available(torch.bfloat16, cpu, "int8")  # on the dequantized weight
    assert "dp" not in kernels.available(torch.float32, cpu, "none")
    with pytest.raises(ValueError, match=r"\[16n, 2k\]"):
        native.Dp(torch.randn(24, 64).bfloat16())  # 24 outputs: not whole 16-column blocks
    with pytest.raises(ValueError, match=r"\[16n, 2k\]"):
        native.Dp(torch.randn(16, 33).bfloat16())
    with pytest.raises(ValueError, match="unavailable"):
        native.Dp(torch.randn(16, 32))
    fn = native.Dp(torch.randn(16, 64).bfloat16())
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 32).bfloat16())  # the wrong width would read past x's rows
    with pytest.raises(ValueError, match="against weight"):
        fn(torch.randn(2, 64))
    assert fn(torch.empty(0, 64).bfloat16()).shape == (0, 16)


@needs_dp
def test_a_seeded_sequence_is_bitwise_the_same_alone_or_batched_on_dp() -> None:
    """With dp as the invariant kernel (gemv for the 300-token LM head, which is not whole
    16-column blocks), a seeded row's logits are the same bits alone or beside other prompts
    and decodes."""
    model = tiny_llama(torch.bfloat16)
    policy = fixed_policy(model, torch.bfloat16, "none", "dp")
    plans = tuple(
        p if p.out_features % 16 == 0 else replace(p, choices=("gemv",) * 4, invariant="gemv")
        for p in policy.plans
    )
    policy = replace(policy, plans=plans)
    assert sum(p.invariant == "dp" for p in plans) == 4  # qkv, o, gate_up, down
    alone = seeded_logits(model, policy, batched=False)
    together = seeded_logits(model, policy, batched=True)
    assert [torch.equal(a, b) for a, b in zip(alone, together, strict=True)] == [True] * 5


def glue_silu_mul(gu: torch.Tensor, hidden: int) -> torch.Tensor:
    """decode.c's SiLU(gate) * up of gu [rows, 2I] alone (rows `hidden` wide, as in a step)."""
    rows, inter = gu.shape[0], gu.shape[1] // 2
    shape = native.DecodeShape(hidden, 1, 1, 2, inter, 1e-6, gu.dtype)
    act = gu.new_empty(rows, inter)
    native.DecodeGlue(shape, 0).silu_mul(native.GlueRows(shape, rows), gu.contiguous(), act)
    return act


@needs_amx
@pytest.mark.parametrize(
    ("m", "inter", "k"), [(1, 16, 32), (5, 48, 64), (17, 96, 96), (70, 32, 64)]
)
def test_gate_up_tiles_give_the_same_bits_as_the_product_and_then_the_glues_silu(
    m: int, inter: int, k: int
) -> None:
    """[gate; up] packed side by side (glu): called, the product of the weight as given; its
    silu_mul, decode.c's SiLU(gate) * up of that product to the bit, each row alone too."""
    g = torch.Generator().manual_seed(m + inter + k)
    w = torch.randn(2 * inter, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    glu, plain = native.Amx(w, glu=True), native.Amx(w)
    product = plain(x)
    assert torch.equal(glu(x), product)
    act = glu.silu_mul(x)
    assert act.shape == (m, inter) and act.dtype == torch.bfloat16
    assert torch.equal(act, glue_silu_mul(product, k))
    gate, up = product.float().chunk(2, dim=-1)
    torch.testing.assert_close(act.float(), F.silu(gate) * up, atol=0.05, rtol=2**-6)
    for i in {0, m - 1}:
        assert torch.equal(glu.silu_mul(x[i : i + 1])[0], act[i])


@needs_amx
def test_gate_up_tiles_refuse_what_they_cannot_pair() -> None:
    w = torch.randn(96, 64).bfloat16()
    with pytest.raises(ValueError, match="gate/up tiles"):
        native.Amx(torch.randn(48, 64).bfloat16(), glu=True)  # halves of 24: not whole tiles
    with pytest.raises(ValueError, match="gate/up tiles"):
        native.Amx(w, torch.zeros(96).bfloat16(), glu=True)  # a bias goes before the SiLU
    with pytest.raises(ValueError, match="needs gate/up tiles"):
        native.Amx(w).silu_mul(torch.randn(2, 64).bfloat16())
    with pytest.raises(ValueError, match="bf16 only"):
        native.Amx(w, glu=True)(torch.randn(2, 64).bfloat16(), float_out=True)
    with pytest.raises(ValueError, match="against weight"):
        native.Amx(w, glu=True).silu_mul(torch.randn(2, 32).bfloat16())
    # what cannot be paired is built unpaired, as any other weight
    assert not kernels.build("amx", w, torch.zeros(96).bfloat16(), None, 4, glu=True).glu
    assert kernels.build("amx", w, None, None, 4, glu=True).glu


@needs_amx
def test_a_gate_up_linear_fuses_only_the_buckets_that_run_amx() -> None:
    w = torch.randn(64, 32).bfloat16()
    plan = ShapePlan(64, 32, ("gemv", "gemv", "amx", "amx"), "amx", False)
    lin = Linear(w, None, 16, plan, glu=True)
    x = torch.randn(12, 32).bfloat16()
    assert lin.silu_mul(x[:4]) is None  # gemv there: the caller multiplies, then SiLU
    assert torch.equal(lin.silu_mul(x), glue_silu_mul(lin(x), 32))
    assert torch.equal(lin(x), Linear(w, None, 16, plan)(x))  # its product as unpaired


@needs_amx
def test_a_seeded_sequence_is_bitwise_the_same_alone_or_batched_on_amx() -> None:
    """With amx as the invariant kernel (gemv for the 300-token LM head, which is not whole
    tiles), a seeded row's logits are the same bits alone or beside other prompts and decodes."""
    model = tiny_llama(torch.bfloat16)
    policy = fixed_policy(model, torch.bfloat16, "none", "amx")
    plans = tuple(
        p if p.out_features % 16 == 0 else replace(p, choices=("gemv",) * 4, invariant="gemv")
        for p in policy.plans
    )
    policy = replace(policy, plans=plans)
    assert sum(p.invariant == "amx" for p in plans) == 4  # qkv, o, gate_up, down
    alone = seeded_logits(model, policy, batched=False)
    together = seeded_logits(model, policy, batched=True)
    assert [torch.equal(a, b) for a, b in zip(alone, together, strict=True)] == [True] * 5


def test_onednns_isa_cap_hides_the_amx_kernel_too() -> None:
    """A run with ONEDNN_MAX_CPU_ISA below AMX stands for a CPU without it, for every kernel."""
    code = "import torch\nfrom genserve.model import kernels, native\n"
    code += "names = kernels.available(torch.bfloat16, torch.device('cpu'), 'none')\n"
    code += "print(native.amx_ready(), names)"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=True, cwd=ROOT,
    )  # fmt: skip
    ready, names = done.stdout.strip().split(" ", 1)
    assert ready == "False" and "amx" not in names and "gemv" in names


@pytest.mark.parametrize(("cap", "hidden"), [("AVX512_CORE", True), ("AVX512_CORE_VNNI", False)])
def test_onednns_isa_cap_below_vnni_hides_the_vnni_kernel(cap: str, hidden: bool) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE stands for a CPU without VNNI (Skylake-SP): no vnni."""
    if not native.vnni_ready():
        pytest.skip("no AVX512-VNNI here")
    code = "import torch\nfrom genserve.model import kernels, native\n"
    code += "names = kernels.available(torch.bfloat16, torch.device('cpu'), 'int8')\n"
    code += "print(native.vnni_ready(), names)"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=True, cwd=ROOT,
    )  # fmt: skip
    ready, names = done.stdout.strip().split(" ", 1)
    assert (ready == "False") == hidden and ("'vnni'" in names) == (not hidden)
    assert "'gemv'" in names


@pytest.mark.parametrize("kind", ["gemv", "amx", "dp", "linear"])
def test_logits_are_float32_sums_not_rounded_to_the_models_dtype(kind) -> None:
    """A bf16 model's logits from genserve's own kernels are their float32 sums as they are:
    against a float64 reference they are far closer than the same sums rounded to bf16 (the
    cast path, which torch's kernels keep)."""
    if kind == "amx" and not native.amx_ready():
        pytest.skip("no AMX here")
    if kind == "dp" and not native.dp_ready():
        pytest.skip("no AVX512-BF16 here")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 64, generator=g).bfloat16()
    x = torch.randn(5, 64, generator=g).bfloat16()
    head = Linear(w, None, 4, ShapePlan(256, 64, (kind,) * 4, kind, False))
    want = x.double() @ w.double().T
    for invariant in (False, True):
        got = head.logits(x, invariant)
        assert got.dtype == torch.float32
        err = (got.double() - want).abs().max().item()
        if kind == "linear":  # torch's bf16 output, cast: a bf16 rounding's error
            assert err > 1e-3
        else:
            assert err < 1e-4


PROMPT_KINDS = [
    pytest.param("amx", marks=needs_amx),
    pytest.param(
        "dp", marks=pytest.mark.skipif(not native.dp_ready(), reason="no AVX512-BF16 here")
    ),
]


def prompt_kernel(kind: str):  # noqa: ANN201
    return native.amx_attend_causal if kind == "amx" else native.dp_attend_causal


def cache_views(kv: int, heads: int, dim: int, start: int, n: int, seed: int = 8):  # noqa: ANN201
    """q [n, heads, dim] and views of a layer's cache rows for positions 0 .. start + n - 1
    (from an offset, as the runner passes them), all bf16."""
    g = torch.Generator().manual_seed(seed)
    rows = start + n + 9
    kc = torch.randn(kv, rows, dim, generator=g).bfloat16()
    vc = torch.randn(kv, rows, dim, generator=g).bfloat16()
    q = torch.randn(n, heads, dim, generator=g).bfloat16()
    return q, kc[:, 3 : 3 + start + n], vc[:, 3 : 3 + start + n]


@pytest.mark.parametrize("kind", PROMPT_KINDS)
@pytest.mark.parametrize(
    ("kv", "heads", "dim", "start", "n"),
    [
        (3, 9, 64, 0, 200),
        (3, 9, 64, 100, 37),
        (2, 4, 128, 0, 70),
        (1, 2, 32, 5, 16),
        (3, 9, 64, 0, 1),
    ],
)
def test_prompt_attention_kernels_match_sdpa(kind, kv, heads, dim, start, n) -> None:
    """amx.c's and dp.c's causal attention of a prompt chunk at positions start .. start +
    n - 1 over a view of a cache (rows from an offset), against float32 SDPA under the
    runner's causal mask: no further from it than bf16 SDPA itself (partial row blocks,
    groups, 32-128 dims)."""
    attend = prompt_kernel(kind)
    q, keys, values = cache_views(kv, heads, dim, start, n)
    out = attend(q, keys, values, start)
    mask = torch.ones(n, start + n, dtype=torch.bool).tril(start)
    qt = q.transpose(0, 1)[None]
    want = F.scaled_dot_product_attention(
        qt.float(), keys[None].float(), values[None].float(), attn_mask=mask, enable_gqa=True
    )[0].transpose(0, 1)
    bf16 = F.scaled_dot_product_attention(
        qt, keys[None], values[None], attn_mask=mask, enable_gqa=True
    )[0].transpose(0, 1)
    err = (out.float() - want).abs().max().item()
    assert err <= max(2 * (bf16.float() - want).abs().max().item(), 2**-8)
    with pytest.raises(ValueError, match=f"{kind} attention"):  # keys for another length
        attend(q, keys, values, start + 1)
    with pytest.raises(ValueError, match=f"{kind} attention"):
        attend(q.float(), keys, values, start)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_a_prompt_rows_attention_is_the_same_bits_in_any_chunk(kind) -> None:
    """A row's result depends on its query and the keys it sees alone: rows 100-139 of a
    140-row prompt give the same bits attended as one chunk, as a later chunk of 40, or one
    at a time in chunks of 16 (each as its own call)."""
    attend = prompt_kernel(kind)
    q, keys, values = cache_views(3, 9, 64, 0, 140)
    whole = attend(q, keys, values, 0)[100:]
    later = attend(q[100:].clone(), keys[:, :140], values[:, :140], 100)
    assert torch.equal(whole, later)
    for r in range(100, 140 - 16 + 1, 8):
        part = attend(q[r : r + 16].clone(), keys[:, : r + 16], values[:, : r + 16], r)
        assert torch.equal(part, whole[r - 100 : r - 100 + 16])


@pytest.mark.skipif(not native.dp_ready(), reason="no AVX512-BF16 here")
def test_prompt_c_refuses_head_dims_it_does_not_take() -> None:
    q, keys, values = cache_views(1, 2, 96, 0, 20)
    with pytest.raises(ValueError, match="dp attention"):
        native.dp_attend_causal(q, keys, values, 0)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_a_bf16_runner_with_a_prompt_kernel_gives_sdpas_logits(kind) -> None:
    """The runner's prompt chunks through amx.c's or dp.c's attention (as chosen where it
    measures faster) give the logits SDPA gives, to bf16's precision, over a prompt and its
    decodes."""
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(torch.bfloat16)  # head_dim 32
    ids = [int(i) for i in torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1))]

    def logits(kind: str) -> torch.Tensor:
        runner = LlamaRunner(model, 2, 128, batch_invariant=False)
        runner.prompt_attention = kind
        every_row = SamplingParams(prompt_logprobs=0)
        first = runner.execute(
            StepInput((ChunkInput("a", 0, tuple(ids[:24]), 0, False, every_row, 0),))
        )
        rest = runner.execute(
            StepInput((ChunkInput("a", 0, tuple(ids[24:]), 24, True, every_row, 0),))
        )
        return torch.cat([first, rest])

    tiles, sdpa = logits(kind), logits("sdpa")
    assert tiles.shape == sdpa.shape == (40, 300)
    torch.testing.assert_close(tiles, sdpa, atol=0.05, rtol=0.05)
    assert not torch.equal(tiles, sdpa)  # the tiles' path did run
