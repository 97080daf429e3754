"""genserve's own CPU kernels (model/native.py). The row-by-row linear (gemv.c), built here
with the system's compiler, must compute what F.linear computes (on the int8 weights
dequantized, for int8), keep a row's bits whatever the other rows of the call, refuse what it
cannot multiply, and leave torch's kernels serving where it cannot be built. The lanes'
decode attention (attend.c) must compute SDPA's result."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genserve.model import kernels, native
from genserve.model.hardware import row_invariance
from tests.unit.test_hardware import fixed_policy, seeded_logits, tiny_llama

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


def test_through_kernels_build_with_a_bias_and_strided_input() -> None:
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    fn = kernels.build("gemv", w, b, None, 4)
    x = torch.randn(32, 3, generator=g).t()  # not contiguous
    assert torch.allclose(fn(x), F.linear(x, w, b), atol=1e-5)
    quant = kernels.quantize_int8(w)
    fn8 = kernels.build("gemv", None, b, quant, 4)  # reads the int8 weights only
    assert torch.allclose(fn8(x), F.linear(x, quant.dequantize(torch.float32), b), atol=1e-4)


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
def test_lane_attention_matches_sdpa_over_each_lanes_own_length(dtype) -> None:
    """Rows in lanes 0, 3 and 1 of a cache [kv, lanes * lane_len, D], each attending its own
    number of positions, against SDPA on those positions; 9 query heads over 3 KV heads."""
    g = torch.Generator().manual_seed(6)
    kv, heads, dim, lane = 3, 9, 64, 40
    keys = torch.randn(kv, 4 * lane + 8, dim, generator=g).to(dtype)
    values = torch.randn(kv, 4 * lane + 8, dim, generator=g).to(dtype)
    q = torch.randn(3, heads, dim, generator=g).to(dtype)
    lanes = torch.tensor([0, 3, 1], dtype=torch.int32)
    lengths = torch.tensor([1, 40, 17], dtype=torch.int32)
    out = native.attend_lanes(q, keys, values, lanes, lengths, 8, lane)  # lanes from row 8
    for j in range(3):
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
