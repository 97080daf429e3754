"""vLLM's allowed_token_ids and bad_words: the sampler's bans (batched, on every draw path),
the worker's bad-word matching over generated tokens, and the wire's checks. Before they were
served, both fields were silently ignored."""

from __future__ import annotations

import pytest
import torch

from genserve.api.sampling import sampling_params
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest
from genserve.engine.types import Request, SamplingParams
from genserve.model.sampler import sample
from genserve.model.worker import bad_word_bans, request_state
from tests.sampling_rows import make_row

VOCAB = 64
ALLOWED = (3, 17, 40)


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def allowed_mask(ids: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def restricted(seed: int, **kw: object):  # noqa: ANN201
    return make_row(1.0, seed, allowed=allowed_mask(ALLOWED), **kw)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.05}])
def test_only_allowed_ids_are_drawn_on_every_draw_path(kw: dict) -> None:
    # No options: sample.c's draw (where it is built); top_k and min_p: torch's.
    drawn = {sample(logits(seed=s), [restricted(s, **kw)]).tokens[0] for s in range(200)}
    assert drawn <= set(ALLOWED)
    assert len(drawn) > 1  # a draw, not a spike


def test_greedy_picks_the_best_allowed_id() -> None:
    x = logits()
    best = max(ALLOWED, key=lambda t: float(x[0, t]))
    assert sample(x, [make_row(0.0, allowed=allowed_mask(ALLOWED))]).tokens == [best]


def test_a_restricted_row_draws_the_same_alone_or_beside_others() -> None:
    x = logits(4, seed=5)
    for seed in range(20):
        alone = sample(x[1:2], [restricted(seed)]).tokens[0]
        rows = [make_row(1.0, 1), restricted(seed), make_row(1.0, 2), restricted(seed + 100)]
        batched = sample(x, rows).tokens
        assert batched[1] == alone
        assert batched[3] in ALLOWED


def test_suppressed_ids_are_banned_in_one_batch() -> None:
    x = torch.zeros(3, VOCAB)
    x[:, 7] = 50.0  # every row's favourite
    rows = [make_row(0.0, suppress=(7,)), make_row(0.0), make_row(0.0, suppress=(7, 8))]
    out = sample(x, rows).tokens
    assert out[1] == 7
    assert out[0] != 7
    assert out[2] not in (7, 8)


def test_a_bad_word_s_last_token_is_banned_only_after_its_prefix() -> None:
    words = ((5,), (9, 10, 11), (12, 13))
    assert bad_word_bans(words, []) == (5,)
    assert bad_word_bans(words, [1, 9, 10]) == (5, 11)
    assert bad_word_bans(words, [9, 10, 4]) == (5,)
    assert bad_word_bans(words, [12]) == (5, 13)
    assert bad_word_bans(words, [10]) == (5,)  # the prefix must be whole


def test_the_worker_state_holds_the_mask_and_the_tokens_bad_words_read() -> None:
    params = SamplingParams(allowed_token_ids=ALLOWED, bad_words_token_ids=((1, 2),))
    state = request_state(Request("r", [1, 2, 3], params), VOCAB, torch.device("cpu"))
    assert state.allowed is not None
    assert state.allowed.nonzero().flatten().tolist() == list(ALLOWED)
    assert state.generated == []  # the prompt's tokens do not count (vLLM's)
    plain = request_state(Request("p", [1], SamplingParams()), VOCAB, torch.device("cpu"))
    assert plain.allowed is None
    assert plain.generated is None


def test_the_wire_fields_reach_the_sampling_record() -> None:
    body = CompletionRequest(
        model="m", prompt="x", allowed_token_ids=[4, 2], bad_words=["hello", " big cat"]
    )
    params = sampling_params(body, 8)
    assert params.allowed_token_ids == (4, 2)
    assert params.bad_words == ("hello", " big cat")
    assert params.bad_words_token_ids == ()  # the runtime tokenizes them (settle)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": ["   "]}, "bad_words"),
        ({"bad_words": "word"}, "bad_words"),
    ],
)
def test_what_cannot_hold_is_refused_by_the_schema(extra: dict, param: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **extra)
    assert caught.value.errors()[0]["loc"][0] == param
