"""Batched temperature/min_p/top_k/top_p (issue 14, item 4): the same kept set as a stable full
sort, row by row the same alone or in a batch, and no vocabulary sort per row (counted)."""

from __future__ import annotations

import pytest
import torch

from genserve.model import native, sampler
from genserve.model.sampler import (
    NEG_INF,
    DrawParams,
    SamplingRow,
    draw_batch,
    sample,
    truncated_weights,
)
from tests.sampling_rows import make_row

VOCAB = 49152


def logits_of(kind: str, rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """peaked: a trained model's shape; flat: a random-weight model's (nucleus of ~45k tokens);
    ties: logits rounded to bf16, as a bf16 lm_head gives them; masked: a grammar's -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    if kind == "peaked":
        return x * 4.0
    if kind == "flat":
        return x * 0.5
    if kind == "ties":
        return (x * 3.0).bfloat16().float()
    masked = x * 2.0
    masked[:, ::3] = float("-inf")
    return masked


def row(temperature: float = 0.8, seed: int = 0, **kw: object) -> SamplingRow:
    return make_row(temperature, seed, **kw)


def params(rows: list[SamplingRow], vocab: int = VOCAB) -> DrawParams:
    return DrawParams.of(rows, vocab, torch.device("cpu"))


def full_sort_kept(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """The definition, on one row: a stable descending sort of the whole vocabulary, then the
    prefix rules, in float64 on the same float32 probabilities the batched path uses."""
    r = r.params
    x = logits * torch.tensor(1.0 / r.temperature, dtype=torch.float32)
    probs = x.softmax(-1)
    if r.min_p:
        probs = probs.masked_fill(probs < r.min_p * probs.max(), 0.0)
    order = x.sort(descending=True, stable=True).indices
    w = probs[order].double()
    w[min(r.top_k or x.numel(), x.numel()) :] = 0.0
    cum = w.cumsum(0)
    kept = w > 0
    if r.top_p < 1.0:
        kept &= (cum - w) < r.top_p * cum[-1]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[kept]] = True
    return mask


COMBOS = [
    {"top_p": 0.95},
    {"top_p": 0.5},
    {"top_p": 0.999},
    {"top_k": 50},
    {"top_k": 3000},  # wider than any candidate list a capped topk would keep
    {"min_p": 0.05},
    {"top_k": 40, "top_p": 0.9},
    {"min_p": 0.1, "top_p": 0.95},
    {"min_p": 0.02, "top_k": 500, "top_p": 0.8, "temperature": 1.3},
]


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "masked"])
def test_kept_set_equals_the_full_sort(kind: str) -> None:
    logits = logits_of(kind, 4)
    for combo in COMBOS:
        rows = [row(**combo)] * 4
        weights = truncated_weights(logits, params(rows))
        for i in range(4):
            expected = full_sort_kept(logits[i], rows[i])
            assert torch.equal(weights[i] > 0, expected), (kind, combo, i)


def test_a_nucleus_of_most_of_the_vocabulary_is_exact() -> None:
    logits = logits_of("flat", 2)
    r = row(top_p=0.99, temperature=1.0)
    kept = truncated_weights(logits, params([r, r])) > 0
    assert kept.sum(-1).min() > 40_000  # no candidate cap: the boundary is found all the same
    assert torch.equal(kept[1], full_sort_kept(logits[1], r))


def test_equal_logits_keep_the_lowest_token_ids() -> None:
    logits = torch.zeros(1, 1000)  # one bucket holds every token: the whole row is sorted
    assert (truncated_weights(logits, params([row(top_p=0.1)], 1000))[0] > 0).nonzero().max() == 99
    kept = truncated_weights(logits, params([row(top_k=7)], 1000))[0] > 0
    assert kept.nonzero().flatten().tolist() == list(range(7))


def test_kept_weights_are_the_probabilities_of_the_full_row() -> None:
    logits = logits_of("peaked", 1)
    r = row(top_p=0.9)
    weights = truncated_weights(logits, params([r]))[0]
    probs = (logits[0] * torch.tensor(1 / 0.8, dtype=torch.float32)).softmax(-1)
    kept = weights > 0
    assert torch.equal(weights[kept], probs[kept])


def test_the_draw_follows_the_truncated_distribution() -> None:
    logits = logits_of("peaked", 1, vocab=64)
    r = row(top_p=0.9, top_k=20)
    weights = truncated_weights(logits, params([r], 64))[0].double()
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # an even grid instead of random draws
    tokens = draw_batch(logits.expand(n, 64), params([r] * n, 64), u)
    freq = torch.bincount(tokens, minlength=64).double() / n
    assert torch.allclose(freq, weights / weights.sum(), atol=2 / n)


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_rows_draw_from_the_nucleus(top_p: float) -> None:
    """top_p alone: a draw from the whole distribution is kept when it lies in the nucleus and
    drawn again from the nucleus otherwise; the tokens follow the nucleus distribution."""
    logits = logits_of("peaked", 1, vocab=64) * 0.1  # a nucleus of tens of tokens
    rows = [row(seed=i, top_p=top_p) for i in range(20_000)]
    weights = truncated_weights(logits, params(rows[:1], 64))[0].double()
    out = sample(logits.expand(len(rows), 64), rows)
    assert not out.errors
    freq = torch.bincount(torch.tensor(out.tokens), minlength=64).double() / len(rows)
    assert (freq[weights == 0] == 0).all()  # never a token outside the nucleus
    assert (weights > 0).sum() > 10
    # 20,000 draws: each frequency within ~4 standard deviations of its probability
    assert torch.allclose(freq, weights / weights.sum(), atol=0.006)


def test_top_p_boundary_inside_a_run_of_equal_logits() -> None:
    """The nucleus ends inside a run of tied tokens: only the lowest ids of the run are kept.
    The first draw's check counts every tie as before the token, so no drawn tie past the
    boundary is taken for inside; each tie the stable order keeps is drawn as often as the
    others."""
    logits = torch.full((1, 64), NEG_INF)
    logits[0, :4] = 2.0
    logits[0, 10:40] = 1.0  # 30 equal logits; top_p 0.6 ends among them
    rows = [row(seed=i, top_p=0.6) for i in range(20_000)]
    weights = truncated_weights(logits, params(rows[:1], 64))[0].double()
    kept = (weights > 0).nonzero()[:, 0].tolist()
    assert kept[:4] == [0, 1, 2, 3] and 10 in kept and 39 not in kept  # the run is cut
    assert kept[4:] == list(range(10, 10 + len(kept) - 4))  # its lowest ids
    out = sample(logits.expand(len(rows), 64), rows)
    freq = torch.bincount(torch.tensor(out.tokens), minlength=64).double() / len(rows)
    assert (freq[weights == 0] == 0).all()
    assert torch.allclose(freq, weights / weights.sum(), atol=0.01)


def mixed_rows(n: int) -> list[SamplingRow]:
    combos = [{}, {"temperature": 0}, *COMBOS]
    return [row(seed=100 + i, **combos[i % len(combos)]) for i in range(n)]


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "masked"])
def test_each_row_draws_the_same_token_alone_and_batched(kind: str) -> None:
    logits = logits_of(kind, 32, seed=5)
    batched = sample(logits, mixed_rows(32)).tokens
    alone = [sample(logits[i : i + 1], [mixed_rows(32)[i]]).tokens[0] for i in range(32)]
    assert batched == alone


def test_seeded_rows_repeat_their_sequence_among_other_rows() -> None:
    logits = logits_of("flat", 8, seed=9)
    mine = [row(seed=42, top_p=0.95), row(seed=43, top_k=50, min_p=0.05)]
    alone = [
        [sample(logits[i : i + 1], [r]).tokens[0] for _ in range(5)]
        for i, r in ((0, mine[0]), (4, mine[1]))
    ]
    again = [row(seed=42, top_p=0.95), row(seed=43, top_k=50, min_p=0.05)]
    others = [row(seed=s, top_p=0.5) for s in range(6)]
    together = [sample(logits, [again[0], *others[:3], again[1], *others[3:]]) for _ in range(5)]
    assert [t.tokens[0] for t in together] == alone[0]
    assert [t.tokens[4] for t in together] == alone[1]


def test_no_row_sorts_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[int] = []
    real_sort, real_topk = torch.Tensor.sort, torch.Tensor.topk

    def counting_sort(self: torch.Tensor, *a: object, **kw: object):
        widths.append(self.shape[-1])
        return real_sort(self, *a, **kw)

    def counting_topk(self: torch.Tensor, k: int, *a: object, **kw: object):
        widths.append(k)
        return real_topk(self, k, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "sort", counting_sort)
    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)
    monkeypatch.setattr(torch, "sort", lambda t, *a, **kw: counting_sort(t, *a, **kw))
    for kind in ("peaked", "flat"):
        rows = [row(seed=i, top_p=0.95, top_k=50 if i % 2 else 0) for i in range(32)]
        assert not sample(logits_of(kind, 32), rows).errors
    # Per step: one topk (the k-th largest for the top_k rows) and at most one sort of the
    # boundary buckets (for the top_p rows whose first draw was not surely in the nucleus),
    # all rows together; both far narrower than the vocabulary.
    assert 2 <= len(widths) <= 4 and max(widths) < VOCAB // 20, widths


def test_a_row_with_no_allowed_token_fails_alone() -> None:
    logits = logits_of("peaked", 3)
    logits[1] = float("-inf")
    alone = sample(logits[2:], [row(seed=2, top_p=0.9)]).tokens
    out = sample(logits, [row(seed=0), row(seed=1, top_p=0.9), row(seed=2, top_p=0.9)])
    assert set(out.errors) == {1} and out.tokens[1] == -1 and out.tokens[2:] == alone


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_with_a_nan_or_inf_logit_fails_alone_on_either_path(bad: float) -> None:
    """sample.c finds such rows itself (no pass for the top logits first); the rows it does
    not take (top_k) are checked before torch draws them. Either way the row fails alone with
    NOT_FINITE and its neighbours draw what they draw alone."""
    logits = logits_of("peaked", 4)
    logits[1, 7] = bad
    logits[3, 5] = bad
    rows = [row(seed=0), row(seed=1, top_p=0.9), row(seed=2), row(seed=3, top_k=5)]
    alone = [sample(logits[i : i + 1], [rows[i]]).tokens[0] for i in (0, 2)]
    rows = [row(seed=0), row(seed=1, top_p=0.9), row(seed=2), row(seed=3, top_k=5)]
    out = sample(logits, rows)
    assert set(out.errors) == {1, 3}
    assert all(str(out.errors[i]) == sampler.NOT_FINITE for i in (1, 3))
    assert out.tokens[1] == out.tokens[3] == -1 and [out.tokens[0], out.tokens[2]] == alone


def test_rows_redone_alone_after_a_failed_batch_draw_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batched draw that raises is redone row by row with the uniforms already drawn: a top_p
    row whose second uniform came from its generator in the failed attempt reuses it. (The
    torch sampler's path: sample.c, which would take these rows, is off here.)"""
    monkeypatch.setattr(native, "library", lambda: None)
    logits = logits_of("flat", 16, seed=3)

    def rows() -> list[SamplingRow]:
        return [row(seed=200 + i, top_p=0.5) for i in range(16)]

    expected = sample(logits, rows()).tokens
    real = sampler.draw_batch
    calls: list[int] = []

    def fails_once(x, params, u, redraw=None):  # noqa: ANN001, ANN202
        calls.append(x.shape[0])
        out = real(x, params, u, redraw)  # draws every second uniform it needs, then fails
        if len(calls) == 1:
            raise RuntimeError("batched draw failed")
        return out

    monkeypatch.setattr(sampler, "draw_batch", fails_once)
    out = sample(logits, rows())
    assert calls[0] == 16 and calls[1:] == [1] * 16  # one failed batch, then each row alone
    assert not out.errors and out.tokens == expected


# -- sample.c: the same first draw in C ---------------------------------------------------------
needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler for sample.c")


def _first_draws_in_torch(x: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    params = DrawParams.of([row(temperature)] * x.shape[0], x.shape[-1], x.device)
    return sampler._inverse_cdf(truncated_weights(x, params), u)


@needs_native
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "masked"])
def test_sample_c_draws_what_the_torch_path_draws(kind: str) -> None:
    """Its weights come from its own e^x (within 2 ulp of torch's): the same uniform lands on
    the same token but where it falls within rounding of a boundary."""
    x = logits_of(kind, 64, seed=11)
    u = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.full((64,), 1 / 0.8)
    drawn = native.draw_rows(x, t, u, torch.ones(64, dtype=torch.float64))
    assert drawn.status == [native.STANDS] * 64  # no top_p: every draw stands
    same = (drawn.tokens == _first_draws_in_torch(x, 0.8, u)).float().mean().item()
    assert same >= 62 / 64, same
    assert torch.isfinite(x.gather(1, drawn.tokens[:, None])).all()  # never a masked token


@needs_native
def test_sample_c_frequencies_follow_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5] * 20])  # 120 ids
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = logits.expand(n, -1).contiguous()
    drawn = native.draw_rows(x, torch.full((n,), 1 / 0.7), u, torch.ones(n, dtype=torch.float64))
    want = torch.softmax(logits[0] / 0.7, -1).double()
    got = torch.bincount(drawn.tokens, minlength=120).double() / n
    assert got[4::6].sum() == 0  # -inf: never drawn
    assert (got - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max()


@needs_native
@pytest.mark.parametrize("kind", ["peaked", "ties"])
def test_sample_c_keeps_exactly_the_draws_inside_the_nucleus_and_a_rows_token_alone(
    kind: str,
) -> None:
    """Its verdicts against the torch sampler's nucleus (a stable sort's), ties included."""
    x = logits_of(kind, 48, seed=5)
    u = torch.rand(48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t, top_p = torch.full((48,), 1.25), torch.full((48,), 0.6, dtype=torch.float64)
    drawn = native.draw_rows(x, t, u, top_p)
    nucleus = truncated_weights(x, DrawParams.of([row(0.8, top_p=0.6)] * 48, VOCAB, x.device))
    stands = torch.tensor(drawn.status) == native.STANDS
    assert 0 < stands.sum() < 48  # some stand, some fell outside
    assert set(drawn.status) == {native.STANDS, native.OUTSIDE}
    inside = nucleus.gather(1, drawn.tokens[:, None])[:, 0] > 0
    assert torch.equal(inside, stands)
    for i in (0, 17, 47):  # the same token and verdict alone as among the 48
        one = native.draw_rows(x[i : i + 1], t[i : i + 1], u[i : i + 1], top_p[i : i + 1])
        assert (one.tokens[0] == drawn.tokens[i]) and one.status[0] == drawn.status[i]


@needs_native
@pytest.mark.parametrize("kind", ["peaked", "ties"])
def test_sample_c_redraws_inside_the_torch_samplers_nucleus_in_proportion(kind: str) -> None:
    x = logits_of(kind, 1, seed=12)
    kept = truncated_weights(x, DrawParams.of([row(0.8, top_p=0.3)], VOCAB, x.device))[0]
    ids = kept.nonzero()[:, 0]
    n = 4000
    u2 = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly over [0, 1)
    tokens = native.redraw_rows(
        x.expand(n, -1), torch.full((n,), 1.25), u2, torch.full((n,), 0.3, dtype=torch.float64)
    )
    assert set(tokens.tolist()) <= set(ids.tolist())  # never outside the nucleus
    assert tokens[0] == ids[0] and tokens[-1] == ids[-1]  # its first and last ids, in id order
    share = torch.bincount(tokens, minlength=VOCAB)[ids].double() / n
    want = (kept[ids] / kept[ids].sum()).double()
    assert (share - want).abs().max() < 2.0 / n + 1e-3  # u2 evenly spread: within a step


@needs_native
def test_sample_c_refuses_what_it_cannot_read_and_leaves_bad_rows_unsettled() -> None:
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample_rows"):
        native.draw_rows(torch.zeros(1, 8, dtype=torch.float64), torch.ones(1), one, one)
    with pytest.raises(ValueError, match="one temperature"):
        native.draw_rows(torch.zeros(2, 8), torch.ones(1), one, one)
    bad = torch.tensor([[0.0, float("nan"), 1.0], [float("-inf")] * 3])
    drawn = native.draw_rows(bad, torch.ones(2), torch.full((2,), 0.5, dtype=torch.float64),
                             torch.ones(2, dtype=torch.float64))  # fmt: skip
    assert drawn.tokens.tolist() == [-1, -1] and drawn.status == [native.CANNOT] * 2


@needs_native
def test_sample_sends_rows_without_top_k_or_min_p_to_sample_c(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = native.draw_rows

    def counting(x, *a):  # noqa: ANN001, ANN002, ANN202
        seen.append(x.shape[0])
        return real(x, *a)

    monkeypatch.setattr(native, "draw_rows", counting)
    rows = [row(seed=1), row(seed=2, top_p=0.9), row(seed=3, top_k=5), row(seed=4, min_p=0.1)]
    rows.append(make_row(0.0, 5))  # greedy: no draw at all
    out = sample(logits_of("peaked", 5), rows)
    assert seen == [2] and not out.errors and min(out.tokens) >= 0


@needs_native
def test_when_sample_c_cannot_run_the_torch_sampler_draws_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def rows() -> list[SamplingRow]:
        return [row(seed=30 + i, top_p=0.9 if i % 2 else 1.0) for i in range(6)]

    logits = logits_of("peaked", 6, seed=8)
    native.set_enabled(False)
    try:
        torch_only = sample(logits, rows()).tokens
    finally:
        native.set_enabled(True)

    def no_memory(*_: object) -> None:
        raise MemoryError("sample_rows: no memory for a row's weights")

    monkeypatch.setattr(native, "draw_rows", no_memory)
    out = sample(logits, rows())
    assert not out.errors and out.tokens == torch_only
