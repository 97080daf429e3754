"""Each sampling parameter does what its definition says, on hand-made distributions."""

import math

import torch

from genserve.model.sampler import (
    SamplingRow,
    apply_penalties,
    min_p_mask,
    sample,
    top_k_top_p_mask,
)
from tests.sampling_rows import make_row

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = torch.log(PROBS)[None]


def row(temperature=1.0, seed=0, **kw) -> SamplingRow:
    return make_row(temperature, seed, **kw)


def tokens(logits: torch.Tensor, n: int = 300, **kw) -> set[int]:
    return {sample(logits, [row(seed=s, **kw)]).tokens[0] for s in range(n)}


def test_temperature_zero_is_argmax() -> None:
    assert sample(LOGITS, [row(temperature=0)]).tokens == [0]


def test_top_k_one_equals_greedy() -> None:
    noisy = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    greedy = sample(noisy, [row(temperature=0)]).tokens
    assert tokens(noisy, 50, top_k=1) == set(greedy)


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    sorted_logits = LOGITS[0].sort(descending=True).values
    assert top_k_top_p_mask(sorted_logits, 0, 0.8).tolist() == [False, False, True, True]
    assert top_k_top_p_mask(sorted_logits, 0, 0.81).tolist() == [False, False, False, True]
    assert tokens(LOGITS, top_p=0.8) == {0, 1}


def test_top_k_prunes() -> None:
    assert top_k_top_p_mask(LOGITS[0], 2, 1.0).tolist() == [False, False, True, True]
    assert tokens(LOGITS, top_k=2) == {0, 1}


def test_min_p_prunes_below_fraction_of_top() -> None:
    # min_p 0.35: threshold 0.175 -> keep 0.5 and 0.3, drop 0.15 and 0.05
    assert min_p_mask(LOGITS[0], 0.35).tolist() == [False, False, True, True]
    assert tokens(LOGITS, min_p=0.35) == {0, 1}
    assert tokens(LOGITS, min_p=0.11) == {0, 1, 2}  # threshold 0.055 drops only 0.05


def test_frequencies_follow_probabilities() -> None:
    r = row(seed=0)
    counts = torch.bincount(torch.tensor([sample(LOGITS, [r]).tokens[0] for _ in range(4000)]))
    assert torch.allclose(counts.float() / counts.sum(), PROBS, atol=0.03)


def test_temperature_flattens_and_sharpens() -> None:
    def share_of_top(t: float) -> float:
        r = row(temperature=t, seed=1)
        draws = [sample(LOGITS, [r]).tokens[0] for _ in range(2000)]
        return draws.count(0) / len(draws)

    assert share_of_top(0.3) > 0.8 > share_of_top(1.0) > share_of_top(2.0)


def test_logit_bias_bans_and_forces() -> None:
    assert 0 not in tokens(LOGITS, logit_bias=((0, -100.0),))
    assert tokens(LOGITS, logit_bias=((3, 100.0),)) == {3}
    assert sample(LOGITS, [row(temperature=0, logit_bias=((2, 100.0),))]).tokens == [2]


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    logits = torch.zeros(4)
    apply_penalties(logits, row(counts=counts, presence_penalty=0.5, frequency_penalty=0.25))
    assert logits.tolist() == [-(3 * 0.25 + 0.5), -(1 * 0.25 + 0.5), 0.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    apply_penalties(logits, row(seen=seen, repetition_penalty=2.0))
    assert logits.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_suppressed_and_grammar_masked_tokens_are_never_drawn() -> None:
    assert sample(LOGITS, [row(temperature=0, suppress=(0,))]).tokens == [1]

    class OnlyTwoAndThree:
        def apply(self, row: torch.Tensor) -> None:
            row[:2] = float("-inf")

    assert tokens(LOGITS, constraint=OnlyTwoAndThree()) == {2, 3}


def test_logprobs_are_the_models_sorted_and_normalised() -> None:
    out = sample(LOGITS, [row(temperature=0, logprobs=3)])
    lp = out.logprobs[0]
    assert lp.token_id == 0 and math.isclose(lp.logprob, math.log(0.5), rel_tol=1e-5)
    values = [v for _, v in lp.top]
    assert [i for i, _ in lp.top] == [0, 1, 2] and values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0


def test_row_result_does_not_depend_on_batch_neighbours() -> None:
    alone = sample(LOGITS, [row(seed=7)]).tokens[0]
    noise = torch.randn(5, 4)
    batch = torch.cat([noise[:2], LOGITS, noise[2:]])
    rows = [row(seed=1), row(temperature=0), row(seed=7), row(top_p=0.5, seed=3), row(top_k=2)]
    assert sample(batch, rows).tokens[2] == alone
