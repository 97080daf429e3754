import torch

from genserve.model.sampler import SamplingRow, sample, top_k_top_p_mask


def row(temperature=1.0, top_p=1.0, top_k=0, seed=0, suppress=()) -> SamplingRow:
    g = torch.Generator().manual_seed(seed)
    return SamplingRow(temperature, top_p, top_k, g, tuple(suppress))


LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_temperature_zero_is_argmax() -> None:
    assert sample(LOGITS, [row(temperature=0)]) == [0]


def test_top_k_one_is_greedy() -> None:
    assert all(sample(LOGITS, [row(top_k=1, seed=s)]) == [0] for s in range(20))


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    sorted_logits = LOGITS.sort(-1, descending=True).values
    mask = top_k_top_p_mask(sorted_logits, [row(top_p=0.8)])
    assert mask.tolist() == [[False, False, True, True]]  # 0.5 + 0.3 reaches 0.8
    draws = {sample(LOGITS, [row(top_p=0.8, seed=s)])[0] for s in range(200)}
    assert draws == {0, 1}


def test_top_k_prunes() -> None:
    draws = {sample(LOGITS, [row(top_k=2, seed=s)])[0] for s in range(200)}
    assert draws == {0, 1}


def test_frequencies_follow_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    r = SamplingRow(1.0, 1.0, 0, g)
    counts = torch.bincount(
        torch.tensor([sample(LOGITS, [r])[0] for _ in range(4000)]), minlength=4
    )
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.03)


def test_suppressed_tokens_are_never_drawn() -> None:
    assert sample(LOGITS, [row(temperature=0, suppress=[0])]) == [1]


def test_row_result_does_not_depend_on_batch_neighbours() -> None:
    alone = sample(LOGITS, [row(seed=7)])
    noise = torch.randn(5, 4)
    batch = torch.cat([noise[:2], LOGITS, noise[2:]])
    rows = [row(seed=1), row(temperature=0), row(seed=7), row(top_p=0.5, seed=3), row(top_k=2)]
    assert sample(batch, rows)[2] == alone[0]
