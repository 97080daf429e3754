"""BatchedHFRunner (issue 17): transformers' own modules on genserve's batched attention and
KV slots give transformers' own numbers, for every family in tests/tiny_families.py."""

from __future__ import annotations

import copy

import pytest
import torch

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model.hf_batched import BatchedHFRunner
from tests.tiny_families import COMMON, FAMILIES, VOCAB, WINDOW, build_family

PLAIN = SamplingParams()
SEEDED = SamplingParams(seed=7)
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def models(family: str, batch_invariant: bool = False):  # noqa: ANN201
    """transformers' eager model (the reference) and a runner over a copy of its weights."""
    ref = build_family(family)
    if ref is None:
        pytest.skip(f"the installed transformers has no {family}")
    return ref, BatchedHFRunner(copy.deepcopy(ref), 6, 128, batch_invariant)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def chunk(rid: str, slot: int, ids: list[int], start: int, params=PLAIN, sample=True):  # noqa: ANN001, ANN201
    return ChunkInput(rid, slot, tuple(ids), start, sample, params, 0)


def last_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_mixed_step_logits_match_transformers(family: str) -> None:
    """Prompt chunks (a later chunk over a cached prefix longer than the window), prompts
    from 0 and several decodes, in the same steps, in scattered slots."""
    ref, runner = models(family)
    a, b, c = prompt(30, 1), prompt(11, 2), prompt(5, 3)
    out = runner.execute(StepInput((chunk("a", 4, a[:17], 0, sample=False), chunk("b", 1, b, 0))))
    torch.testing.assert_close(out[0], last_logits(ref, b), **TOL)
    out = runner.execute(
        StepInput((chunk("b", 1, [7], 11), chunk("a", 4, a[17:], 17), chunk("c", 0, c, 0)))
    )
    for got, ids in zip(out, (b + [7], a, c), strict=True):
        torch.testing.assert_close(got, last_logits(ref, ids), **TOL)
    out = runner.execute(
        StepInput((chunk("a", 4, [11], 30), chunk("b", 1, [13], 12), chunk("c", 0, [9], 5)))
    )
    for got, ids in zip(out, (a + [11], b + [7, 13], c + [9]), strict=True):
        torch.testing.assert_close(got, last_logits(ref, ids), **TOL)


def test_windowed_families_really_cut(family: str) -> None:
    """The window in the tiny config changes the reference's logits (else the tests above
    would not check that the runner honours it)."""
    if FAMILIES[family].get("sliding_window") is None:
        pytest.skip(f"{family}'s tiny config has no sliding window")
    ids = prompt(30, 1)
    full = build_family(family, sliding_window=4096)
    assert not torch.allclose(last_logits(build_family(family), ids), last_logits(full, ids))
    assert len(ids) > WINDOW


def greedy(runner: BatchedHFRunner, prompts: dict[int, list[int]], steps: int, eos: int):  # noqa: ANN201
    """Greedy continuations of several prompts batched (prompt steps, then decodes); EOS
    suppressed as generate's min_new_tokens does."""
    out = {s: [] for s in prompts}
    chunks = tuple(chunk(str(s), s, ids, 0) for s, ids in prompts.items())
    for _ in range(steps):
        logits = runner.execute(StepInput(chunks)).clone()
        logits[:, eos] = float("-inf")
        for s, t in zip(prompts, logits.argmax(-1).tolist(), strict=True):
            out[s].append(t)
        chunks = tuple(
            chunk(str(s), s, [out[s][-1]], len(ids) + len(out[s]) - 1) for s, ids in prompts.items()
        )
    return out


def test_greedy_batched_equals_generate(family: str) -> None:
    ref, runner = models(family)
    prompts = {2: prompt(13, 4), 0: prompt(6, 5), 5: prompt(21, 6)}
    got = greedy(runner, prompts, 10, ref.config.eos_token_id)
    for slot, ids in prompts.items():
        want = ref.generate(
            torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False
        )[0, len(ids) :].tolist()
        assert got[slot] == want, f"slot {slot}"


@pytest.mark.parametrize("x_len", [19, 2])
@pytest.mark.parametrize("deterministic", [False, True], ids=["seeded", "deterministic"])
def test_batched_equals_alone_and_seeded_rows_bitwise(
    family: str, deterministic: bool, x_len: int
) -> None:
    """Several sequences of different lengths batched give each one's numbers alone; a seeded
    sequence among unseeded ones (or any, under --deterministic) gives exactly (bitwise) its
    numbers alone, prompt and decodes, whether or not it shares its forward."""
    _, alone = models(family, deterministic)
    _, batched = models(family, deterministic)
    x, mates = prompt(x_len, 7), {0: prompt(4, 8), 3: prompt(33, 9), 5: prompt(10, 10)}
    want = [alone.execute(StepInput((chunk("x", 1, x, 0, SEEDED),)))[0]]
    mates_alone = [
        alone.execute(StepInput((chunk(str(s), 2, ids, 0),)))[0] for s, ids in mates.items()
    ]
    for t, pos in ((5, x_len), (6, x_len + 1)):
        want.append(alone.execute(StepInput((chunk("x", 1, [t], pos, SEEDED),)))[0])
    first = [chunk(str(s), s, ids, 0) for s, ids in mates.items()]
    out = batched.execute(StepInput((first[0], chunk("x", 4, x, 0, SEEDED), *first[1:])))
    got = [out[1]]
    for m, got_m in zip(mates_alone, (out[0], out[2], out[3]), strict=True):
        torch.testing.assert_close(got_m, m, **TOL)
    for t, pos in ((5, x_len), (6, x_len + 1)):
        steps = [chunk(str(s), s, [1], len(ids) + pos - x_len) for s, ids in mates.items()]
        got.append(
            batched.execute(StepInput((*steps[:2], chunk("x", 4, [t], pos, SEEDED), steps[2])))[2]
        )
    assert [torch.equal(w, g) for w, g in zip(want, got, strict=True)] == [True] * 3


def make_adapter(family: str, folder, seed: int):  # noqa: ANN001, ANN201
    """A peft LoRA on the trainer's targets for this family, with random (non-zero) B."""
    from peft import LoraConfig, get_peft_model

    from genserve.training.trainer import lora_targets

    base = build_family(family)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(base), lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def test_lora_rows_match_peft_beside_base_rows(family: str, tmp_path) -> None:  # noqa: ANN001
    """Two adapters and the base model in one step (prompts and pooled decodes); each row
    gets its own adapter's numbers, as peft computes them."""
    ref, runner = models(family)
    tuned = {n: make_adapter(family, tmp_path / n, s) for n, s in (("x", 1), ("y", 2))}
    for name in tuned:
        runner.add_adapter(name, tmp_path / name)
    seqs = {0: ("x", prompt(12, 3)), 1: (None, prompt(9, 4)), 2: ("y", prompt(15, 5))}
    models_of = {"x": tuned["x"], "y": tuned["y"], None: ref}

    def lora_chunk(slot: int, ids: list[int], start: int) -> ChunkInput:
        name = seqs[slot][0]
        return ChunkInput(str(slot), slot, tuple(ids), start, True, PLAIN, 0, adapter=name)

    out = runner.execute(StepInput(tuple(lora_chunk(s, ids, 0) for s, (_, ids) in seqs.items())))
    out2 = runner.execute(
        StepInput(tuple(lora_chunk(s, [5], len(i)) for s, (_, i) in seqs.items()))
    )
    for k, (name, ids) in enumerate(seqs.values()):
        torch.testing.assert_close(out[k], last_logits(models_of[name], ids), **TOL)
        torch.testing.assert_close(out2[k], last_logits(models_of[name], ids + [5]), **TOL)
    assert not torch.allclose(out[0], last_logits(ref, seqs[0][1]), **TOL)


class NoInterfaceQwen3:
    """Stands for a remote-code model: transformers' attention interface is not used."""


@pytest.mark.parametrize(
    ("family", "overrides", "runner", "why"),
    [
        ("llama", {}, "LlamaRunner", "hand-written"),
        ("mistral", {"sliding_window": None}, "LlamaRunner", "hand-written"),
        ("mistral", {"sliding_window": WINDOW}, "BatchedHFRunner", "batched"),
        ("qwen3", {}, "BatchedHFRunner", "batched"),
        ("gemma3_text", {}, "BatchedHFRunner", "batched"),
        ("qwen3:remote", {}, "HFRunner", "does not route attention"),
    ],
)
def test_make_runner_picks_and_says_why(family, overrides, runner, why, caplog) -> None:  # noqa: ANN001
    import logging

    from transformers import AutoModelForCausalLM, LlamaConfig

    from genserve.model.dispatch import make_runner

    name, _, variant = family.partition(":")
    if name == "llama":
        model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON))
    else:
        model = build_family(name, "sdpa", **overrides)
    if variant == "remote":  # a class outside transformers without the interface flag
        model.__class__ = type("RemoteQwen3", (NoInterfaceQwen3, type(model)), {})
        model.__class__._supports_attention_backend = False
    with caplog.at_level(logging.INFO, logger="genserve.model.dispatch"):
        picked = make_runner(model, 2, 64)
    assert type(picked).__name__ == runner
    assert f"{runner} " in caplog.text or f"{runner}," in caplog.text
    assert why in caplog.text


def unservable(family: str):  # noqa: ANN201
    """Tiny models that use the attention interface yet keep what the runner does not:
    LFM2's convolution layers carry state across steps, gpt-oss has attention sinks."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    if family not in CONFIG_MAPPING:
        pytest.skip(f"the installed transformers has no {family}")
    extra = {
        "lfm2": dict(layer_types=["conv", "full_attention"]),
        "gpt_oss": dict(num_local_experts=4, head_dim=16, intermediate_size=64),
    }[family]
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[family](**{**COMMON, **extra})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["lfm2", "gpt_oss"])
def test_models_the_runner_would_get_wrong_go_to_hfrunner(family: str, caplog) -> None:  # noqa: ANN001
    """Refused at load with the reason, and the model keeps its own attention."""
    import logging

    from genserve.model.dispatch import make_runner
    from genserve.model.hf_batched import self_check
    from genserve.model.runner import HFRunner

    model = unservable(family)
    assert self_check(model) is not None  # the check alone catches both, whatever the config
    assert model.config._attn_implementation == "eager"
    with caplog.at_level(logging.INFO, logger="genserve.model.dispatch"):
        assert isinstance(make_runner(model, 2, 64), HFRunner)
    assert "HFRunner, one sequence at a time" in caplog.text
    assert model.config._attn_implementation == "eager"


def test_self_check_passes_the_served_families(family: str) -> None:
    from genserve.model.hf_batched import self_check

    model = build_family(family)
    if model is None:
        pytest.skip(f"the installed transformers has no {family}")
    assert self_check(model) is None
