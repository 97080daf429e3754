"""Kernel choice by measurement: the choice logic on given numbers, the cache file, and the
numbers of the int8 and bf16 fast path against fp32 on a tiny random Llama."""

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import hardware, kernels
from genserve.model.hardware import KernelPolicy, ShapePlan, ShapeSpec, choose, policy_for
from genserve.model.runner import LlamaRunner
from tests.tiny_model import SMALL_LLAMA

CPU = torch.device("cpu")
BOTH = (True, True)


def test_each_bucket_takes_the_fastest_kernel_never_one_slower_than_plain_linear() -> None:
    times = {"linear": [10, 50, 90, 900], "onednn": [30, 20, 80, 1000], "int8": [5, 60, 400, 9000]}
    inv = {"linear": (False, False), "onednn": (True, True), "int8": (True, True)}
    choices, invariant, pad = choose(times, inv)
    assert choices == ("int8", "onednn", "onednn", "linear")
    assert invariant == "onednn" and not pad  # linear does not qualify: not row-invariant
    for b, c in enumerate(choices):
        assert times[c][b] <= times["linear"][b]


def test_the_invariant_kernel_keeps_a_bucket_unless_another_is_clearly_faster() -> None:
    times = {"linear": [10, 50, 100, 1000], "onednn": [10.5, 52, 60, 600]}
    choices, invariant, pad = choose(times, {"linear": (False, False), "onednn": (True, False)})
    # 5% slower at one row: within KEEP_GAIN, but slower than plain linear, so linear there.
    assert choices == ("linear", "linear", "onednn", "onednn")
    assert invariant == "onednn" and pad  # a lone row sums differently: padded to two


def test_without_any_row_invariant_kernel_the_best_overall_is_used() -> None:
    times = {"linear": [1, 2, 3, 4], "onednn": [2, 4, 6, 8]}
    _, invariant, pad = choose(times, {})
    assert invariant == "linear" and pad


def small_specs() -> list[ShapeSpec]:
    return [ShapeSpec(64, 32, 64), ShapeSpec(96, 32, 8)]


def test_the_choice_is_cached_per_machine_and_shapes(tmp_path: Path) -> None:
    first = policy_for(small_specs(), torch.float32, "none", CPU, 64, 4, tmp_path)
    if first.source == "measured" and not (tmp_path / hardware.CACHE_FILE).exists():
        pytest.skip("machine under load: a measurement is not cached (by design)")
    data = json.loads((tmp_path / hardware.CACHE_FILE).read_text())
    assert len(data) == 1
    again = policy_for(small_specs(), torch.float32, "none", CPU, 64, 4, tmp_path)
    assert again.source == "cache" and again.plans == first.plans and again.tag() == first.tag()
    other = policy_for(small_specs()[:1], torch.float32, "none", CPU, 64, 4, tmp_path)
    assert other.source == "measured"  # other shapes: another entry
    # another build of genserve's C kernels (new sources): measured again, not read
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hardware.native, "build_id", lambda: "native-0123456789abcdef")
        rebuilt = policy_for(small_specs(), torch.float32, "none", CPU, 64, 4, tmp_path)
    assert rebuilt.source == "measured"
    (tmp_path / hardware.CACHE_FILE).write_text("{not json")
    assert policy_for(small_specs(), torch.float32, "none", CPU, 64, 4, tmp_path).plans


def test_dtype_auto_is_measured_once_per_machine_and_never_cached_under_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dtype auto` times bf16 against fp32 kernels; the choice is kept with the kernels',
    so a later start (on a machine busy with another server's start) reads it, and a choice
    made under load is not kept."""
    features = hardware.detect(CPU)
    monkeypatch.setattr(hardware, "detect", lambda _: dataclasses.replace(features, bf16=True))
    times = {torch.bfloat16: 100.0, torch.float32: 400.0}
    timed: list[torch.dtype] = []

    def decode_time(spec: ShapeSpec, dtype: torch.dtype, device: torch.device) -> float:
        timed.append(dtype)
        return times[dtype]

    monkeypatch.setattr(hardware, "_decode_time", decode_time)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    specs = small_specs()
    assert hardware.auto_dtype(CPU, specs, tmp_path) == torch.bfloat16 and timed
    entries = json.loads((tmp_path / hardware.CACHE_FILE).read_text()).values()
    assert {"dtype": "bfloat16", "bf16_us": 200, "fp32_us": 800} in entries
    timed.clear()
    times[torch.bfloat16] = 4000.0  # a busy machine's times are not even taken
    assert hardware.auto_dtype(CPU, specs, tmp_path) == torch.bfloat16 and not timed
    # other shapes, measured under load: used for this start, not kept
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    other = [ShapeSpec(128, 32, 64)]
    assert hardware.auto_dtype(CPU, other, tmp_path) == torch.float32 and timed
    timed.clear()
    assert hardware.auto_dtype(CPU, other, tmp_path) == torch.float32 and timed  # again
    assert len(json.loads((tmp_path / hardware.CACHE_FILE).read_text())) == 1


@pytest.fixture
def cache_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """hardware.read_bandwidth as a cache would answer it: 100 GB/s for a buffer of up to 8
    MiB, 20 past it; the sizes asked for are listed. cache_holds forgets earlier answers."""
    asked: list[int] = []

    def bandwidth(mib: int, repeats: int = 5) -> float:
        asked.append(mib)
        return 100.0 if mib <= 8 else 20.0

    monkeypatch.setattr(hardware, "read_bandwidth", bandwidth)
    hardware.cache_holds.cache_clear()
    yield asked
    hardware.cache_holds.cache_clear()


def test_a_weight_is_timed_from_memory_unless_the_models_whole_step_fits_the_cache(
    monkeypatch: pytest.MonkeyPatch, cache_probe: list[int]
) -> None:
    """A decode step of a model larger than the cache reads every weight from memory: a small
    one is timed in as many copies as overflow the cache twice (16 left a 960x576 bf16 weight
    in a 32 MiB L3, where a bf16 kernel beat the int8 ones a step runs faster), and a model
    whose whole step fits in the cache is timed warm, as its steps run."""
    monkeypatch.setattr(hardware, "last_level_cache", lambda: 32 * 2**20)
    cfg = LlamaConfig(**{**SMALL_LLAMA, "hidden_size": 576, "intermediate_size": 1536,
                         "num_hidden_layers": 30, "vocab_size": 49152})  # fmt: skip
    specs = hardware.model_specs(cfg, 512, 32)
    sizes = [s.out_features * s.in_features for s in specs]
    step = 30 * sum(sizes[:4]) + sizes[4]
    assert {s.step_weights for s in specs} == {step}
    qkv = specs[0]
    assert hardware.cold_copies(qkv, torch.bfloat16) == -(-64 * 2**20 // (sizes[0] * 2))
    assert hardware.cold_copies(qkv, torch.bfloat16) > hardware.COLD_MAX_COPIES
    alone = dataclasses.replace(qkv, step_weights=0)  # its model unknown: at most 16
    assert hardware.cold_copies(alone, torch.bfloat16) == hardware.COLD_MAX_COPIES
    assert cache_probe == []  # larger than the cache: nothing to measure
    tiny = hardware.model_specs(LlamaConfig(**SMALL_LLAMA), 64, 4)
    assert all(hardware.cold_copies(s, torch.float32) == 1 for s in tiny)
    assert cache_probe == [1, 64]  # measured once: warm, then past the 32 MiB cache


def test_a_reported_cache_that_reads_at_memory_speed_times_weights_cold(
    monkeypatch: pytest.MonkeyPatch, cache_probe: list[int]
) -> None:
    """A VM that reports its host's 480 MiB cache, where the 270 MB bench model reads at
    memory speed warm: its weights are timed cold, each among copies as large as the step it
    runs in; where the step is read faster warm, it is timed warm."""
    monkeypatch.setattr(hardware, "last_level_cache", lambda: 480 * 2**20)
    cfg = LlamaConfig(**{**SMALL_LLAMA, "hidden_size": 576, "intermediate_size": 1536,
                         "num_hidden_layers": 30, "vocab_size": 49152})  # fmt: skip
    qkv = hardware.model_specs(cfg, 512, 32)[0]
    assert qkv.step_weights * 2 < 480 * 2**20  # it would fit, as reported
    size = qkv.out_features * qkv.in_features * 2
    assert hardware.cold_copies(qkv, torch.bfloat16) == -(-qkv.step_weights * 2 // size)
    assert cache_probe[0] == qkv.step_weights * 2 >> 20 and cache_probe[1] == 1024
    small = dataclasses.replace(qkv, step_weights=4 * 2**20)  # 8 MB: read faster warm
    assert hardware.cold_copies(small, torch.bfloat16) == 1


def test_a_measured_policy_names_a_plan_for_each_shape_and_bucket() -> None:
    policy = hardware.measure_policy(small_specs(), torch.float32, "int8", CPU, 64, 4)
    assert [(p.out_features, p.in_features) for p in policy.plans] == [(64, 32), (96, 32)]
    for p in policy.plans:
        assert len(p.choices) == len(hardware.BUCKETS)
        assert set(p.choices) | {p.invariant} <= set(p.times_us) <= set(kernels.KERNELS)
        for b, c in enumerate(p.choices):
            assert p.times_us[c][b] <= p.times_us["linear"][b]
    assert KernelPolicy.from_json(policy.to_json()).plans == policy.plans


NO_AMX = """
import json, torch
from genserve.model import hardware
f = hardware.detect("cpu")
specs = [hardware.ShapeSpec(256, 128, 64), hardware.ShapeSpec(512, 128, 64)]
p = hardware.measure_policy(specs, torch.float32, "none", torch.device("cpu"), 64, 8)
print(json.dumps({"bf16": f.bf16, "cap": f.isa_cap, "plans": p.to_json()["plans"]}))
"""


def test_a_machine_without_bf16_units_stays_fp32_and_never_picks_slower_than_linear() -> None:
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE hides AMX and AVX512-BF16 from oneDNN (read once per
    process: hence a subprocess). The times are that run's; the assert is on the logic."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    out = subprocess.run(
        [sys.executable, "-c", NO_AMX], env=env, capture_output=True, text=True, check=True
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cap"] == "AVX512_CORE" and got["bf16"] is False
    for plan in got["plans"]:
        linear = plan["times_us"]["linear"]
        for b, c in enumerate(plan["choices"]):
            assert plan["times_us"][c][b] <= linear[b]


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=128, intermediate_size=256)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(dtype)


def fixed_policy(model, dtype: torch.dtype, quantization: str, kind: str) -> KernelPolicy:
    """One kernel for every shape and bucket: each kernel's numbers are tested, not whichever
    a measurement picked."""
    specs = hardware.model_specs(model.config, 64, 4)
    plans = tuple(
        hardware.ShapePlan(s.out_features, s.in_features, (kind,) * 4, kind, False) for s in specs
    )
    return KernelPolicy(str(dtype).removeprefix("torch."), quantization, plans, "test")


def runner_logits(model, policy: KernelPolicy, ids: list[int]) -> torch.Tensor:
    runner = LlamaRunner(model, 4, 128, batch_invariant=False, policy=policy)
    every_row = SamplingParams(prompt_logprobs=0)
    step = StepInput((ChunkInput("a", 0, tuple(ids), 0, True, every_row, 0),))
    return runner.execute(step)


def skip_unless_it_builds(kind: str, dtype: torch.dtype) -> None:
    """oneDNN's bf16 weights need AVX-512 (or AVX-NE-CONVERT): on an AVX2-only CPU the
    kernel does not exist, and the policy never offers it (hardware.candidates)."""
    w = torch.randn(64, 64, dtype=dtype)
    try:
        kernels.build(kind, w, None, kernels.quantize_int8(w), 1)(torch.zeros(2, 64, dtype=dtype))
    except (RuntimeError, ValueError) as e:  # gemv: ValueError where no compiler built it
        pytest.skip(f"{kind} in {dtype} does not build on this CPU: {e}")


@pytest.mark.parametrize(
    ("dtype", "quantization", "kind", "bound"),
    [
        (torch.bfloat16, "none", "onednn", 0.05),
        (torch.bfloat16, "none", "linear", 0.05),
        (torch.float32, "int8", "int8", 0.1),
        (torch.float32, "int8", "onednn", 0.1),
        (torch.bfloat16, "int8", "int8", 0.1),
        (torch.bfloat16, "none", "gemv", 0.05),
        (torch.float32, "int8", "gemv", 0.1),
        (torch.bfloat16, "int8", "gemv", 0.1),
    ],
)
def test_bf16_and_int8_logits_stay_close_to_fp32(dtype, quantization, kind, bound) -> None:
    skip_unless_it_builds(kind, dtype)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    model = tiny_llama()
    want = runner_logits(model, fixed_policy(model, torch.float32, "none", "linear"), ids)
    low = tiny_llama(dtype)
    got = runner_logits(low, fixed_policy(low, dtype, quantization, kind), ids)
    assert got.dtype == torch.float32  # logits are fp32 whatever the compute dtype
    # The largest error relative to the logits' spread over the vocabulary.
    err = ((got - want).abs().max() / want.std()).item()
    assert err < bound, err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_int8_weights_round_trip_within_half_a_step() -> None:
    w = torch.randn(64, 32)
    q = kernels.quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scales.shape == (64,)
    assert ((q.dequantize(torch.float32) - w).abs() <= q.scales[:, None] / 2 + 1e-6).all()


def test_int8_is_offered_only_for_widths_its_kernel_sums_whole() -> None:
    """torch's CPU int8 kernel crashed the process (or summed garbage) for an inner width
    that is not a multiple of 16 on an AMX Xeon: such a shape is timed with the others only,
    and a width of 48 still gets int8, exact to its bf16 rounding."""
    cpu = torch.device("cpu")
    odd = hardware.candidates(ShapeSpec(64, 24, 8), torch.bfloat16, "int8", cpu, 8)
    assert "int8" not in odd and "linear" in odd
    with pytest.raises(ValueError, match="multiple of 16"):
        w = torch.randn(64, 24)
        kernels.build("int8", w, None, kernels.quantize_int8(w), 1)
    fine = hardware.candidates(ShapeSpec(64, 48, 8), torch.bfloat16, "int8", cpu, 8)
    assert "int8" in fine
    w = torch.randn(64, 48)
    q = kernels.quantize_int8(w)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    got = kernels.build("int8", None, None, q, 1)(x).float()
    want = x.float() @ q.dequantize(torch.float32).t()
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.02


LOW = [(torch.float32, "int8"), (torch.bfloat16, "int8"), (torch.bfloat16, "none")]


@pytest.mark.parametrize("deterministic", [True, False])  # per-adapter passes, or fused
@pytest.mark.parametrize(("dtype", "quantization"), LOW)
def test_lora_adapters_apply_on_int8_and_bf16_weights(
    tmp_path: Path, deterministic: bool, dtype, quantization: str
) -> None:
    from tests.unit.test_lora import base, make_adapter

    ref = make_adapter(tmp_path / "a", seed=1)
    plain = base()
    model = base().to(dtype)
    policy = hardware.measure_policy(
        hardware.model_specs(model.config, 64, 4), dtype, quantization, CPU, 64, 4
    )
    runner = LlamaRunner(model, 4, 64, batch_invariant=deterministic, policy=policy)
    runner.add_adapter("a", tmp_path / "a")
    x, y = [5, 6, 7, 8], [9, 10, 11]
    p = SamplingParams()
    step = (
        ChunkInput("x", 0, tuple(x), 0, True, p, 0, "a"),
        ChunkInput("y", 1, tuple(y), 0, True, p, 0),
    )
    out = runner.execute(StepInput(step))
    with torch.no_grad():
        want_x = ref(input_ids=torch.tensor([x])).logits[0, -1]
        want_y = plain(input_ids=torch.tensor([y])).logits[0, -1]
        base_x = plain(input_ids=torch.tensor([x])).logits[0, -1]
    adapter_effect = (want_x - base_x).abs().max()
    assert (out[0] - want_x).abs().max() < 0.1 * adapter_effect
    assert (out[1] - want_y).abs().max() / want_y.std() < 0.1


BF16_NOT_INVARIANT = pytest.mark.xfail(
    reason="oneDNN's and F.linear's bf16 kernels at K=1536 round a row differently at some "
    "row counts for ~3% of random inputs: a start-up check on random data cannot prove "
    "invariance, so seeded requests under --dtype bfloat16/auto may differ alone vs batched",
    strict=False,
)


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [
        (torch.float32, "int8"),
        pytest.param(torch.bfloat16, "int8", marks=BF16_NOT_INVARIANT),
        pytest.param(torch.bfloat16, "none", marks=BF16_NOT_INVARIANT),
        (torch.float32, "none"),
    ],
)
def test_a_seeded_sequence_is_bitwise_the_same_alone_or_batched_with_measured_kernels(
    dtype, quantization: str
) -> None:
    """DESIGN rule 4 with kernels chosen per row bucket: a seeded row takes the plan's one
    invariant kernel whatever the batch."""
    torch.manual_seed(0)
    cfg = dict(SMALL_LLAMA, hidden_size=256, intermediate_size=1536, num_attention_heads=8)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(dtype)
    policy = hardware.measure_policy(
        hardware.model_specs(model.config, 64, 8), dtype, quantization, CPU, 64, 8
    )
    alone = seeded_logits(model, policy, batched=False)
    together = seeded_logits(model, policy, batched=True)
    assert [torch.equal(a, b) for a, b in zip(alone, together, strict=True)] == [True] * 5


def seeded_logits(model, policy: KernelPolicy, batched: bool) -> list[torch.Tensor]:
    """A seeded sequence's logits over its prompt step and 4 decodes, alone or with three
    unseeded mates (prompts of 50, 3 and 90 tokens, then their decodes) in the same steps."""
    seeded = SamplingParams(seed=7)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 300, (37,), generator=g).tolist()
    mates = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (50, 3, 90)]
    r = LlamaRunner(model, 8, 256, batch_invariant=False, policy=policy)
    others = [ChunkInput(str(i), i, tuple(m), 0, True, SamplingParams(), 0)
              for i, m in enumerate(mates)] if batched else []  # fmt: skip
    out = [r.execute(StepInput((*others, ChunkInput("x", 5, tuple(x), 0, True, seeded, 0))))[-1]]
    for step in range(4):
        dec = [ChunkInput(str(i), i, (1,), len(m) + step, True, SamplingParams(), 0)
               for i, m in enumerate(mates)] if batched else []  # fmt: skip
        xs = ChunkInput("x", 5, (7 + step,), len(x) + step, True, seeded, 0)
        out.append(r.execute(StepInput((*dec, xs)))[-1])
    return out


def test_the_policy_reports_its_chosen_kernels_against_plain_linear() -> None:
    """The start-up log line, `genserve doctor` and the bench print how the chosen kernels'
    measured times compare with plain F.linear's (issue 14: never slower on any machine)."""
    times = {"linear": [10.0, 20.0, 40.0, 80.0], "gemv": [5.0, 25.0, 50.0, 90.0],
             "amx": [12.0, 22.0, 20.0, 40.0]}  # fmt: skip
    plan = ShapePlan(64, 32, ("gemv", "linear", "amx", "amx"), "amx", False, times)
    policy = KernelPolicy("bfloat16", "none", (plan,), "test")
    assert policy.against_linear() == (
        "against F.linear: the chosen kernels take 0.50-1.00x its time (worst 64x32) over 4 "
        "shape-buckets"
    )
    slower = dataclasses.replace(plan, choices=("amx",) * 4)
    assert "0.50-1.20x" in dataclasses.replace(policy, plans=(slower,)).against_linear()
    untimed = dataclasses.replace(policy, plans=(dataclasses.replace(plan, times_us={}),))
    assert "not timed" in untimed.against_linear()
