"""One request failing in sampling, grammar or detokenizing ends alone (issue 13, item 3).

The engine core runs here with a fake worker (plain Python, no model); the sampler with real
tensors; the detokenizer's stop-string search is counted, never timed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genserve.engine.core import EngineCore
from genserve.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from genserve.engine.types import (
    FailureKind,
    FinishReason,
    Request,
    RequestFailure,
    SampledToken,
    SamplingParams,
    StepInput,
    TokenDelta,
    TokenLogprob,
)
from genserve.model.sampler import SamplingRow, sample
from tests.sampling_rows import make_row

POISON = 99  # a token id the fake decoder cannot decode


class FakeWorker:
    """Samples token 7 for every row, except rows of requests named in `failing`."""

    eos_ids = (0,)
    compiled_decode = "off"

    def __init__(self, failing: set[str], tokens: dict[str, int] | None = None) -> None:
        self.failing = failing
        self.tokens = tokens or {}
        self.adapters: set[str] = set()
        self.released: list[str] = []

    def start(self, request: Request) -> None:
        if request.request_id == "cannot-start":
            raise RuntimeError("no grammar for you")

    def prompt_logprobs(self, request_id: str) -> list[TokenLogprob | None] | None:
        return None

    def release(self, request_id: str, slot: int) -> None:
        self.released.append(request_id)

    def add_adapter(self, name: str, path: Path) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def execute(self, step: StepInput) -> list[SampledToken]:
        out = []
        for c in step.chunks:
            if not c.sample:
                continue
            if c.request_id in self.failing:
                out.append(SampledToken(-1, error=RequestFailure("sampler blew up")))
            else:
                out.append(SampledToken(self.tokens.get(c.request_id, 7)))
        return out


class FakeDecoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if POISON in ids:
            raise ValueError("undecodable token")
        return "".join(chr(ord("a") + i % 26) for i in ids)


def run_engine(worker: FakeWorker, requests: list[Request], steps: int = 20) -> list[TokenDelta]:
    published: list[TokenDelta] = []
    core = EngineCore(worker, FakeDecoder(), num_slots=4, token_budget=64, publish=published.extend)
    for r in requests:
        core._add(r)
    for _ in range(steps):
        core.step()
    return published


def req(rid: str, max_tokens: int = 5) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def by_request(deltas: list[TokenDelta], rid: str) -> list[TokenDelta]:
    return [d for d in deltas if d.request_id == rid]


def test_a_row_failing_in_the_sampler_ends_that_request_alone() -> None:
    worker = FakeWorker(failing={"bad"})
    deltas = run_engine(worker, [req("good"), req("bad"), req("other")])
    bad = by_request(deltas, "bad")
    assert len(bad) == 1 and bad[0].finish_reason is FinishReason.ABORT
    assert bad[0].error == RequestFailure("sampler blew up")
    for rid in ("good", "other"):
        mine = by_request(deltas, rid)
        assert [d.finish_reason for d in mine] == [None] * 4 + [FinishReason.LENGTH]
        assert sum(len(d.token_ids) for d in mine) == 5 and all(d.error is None for d in mine)
    assert "bad" in worker.released


def test_a_detokenizer_failure_ends_that_request_alone() -> None:
    worker = FakeWorker(failing=set(), tokens={"bad": POISON})
    deltas = run_engine(worker, [req("good"), req("bad")])
    (bad,) = by_request(deltas, "bad")
    assert bad.finish_reason is FinishReason.ABORT and "detokenizing failed" in bad.error.message
    good = by_request(deltas, "good")
    assert good[-1].finish_reason is FinishReason.LENGTH and good[-1].completion_tokens == 5


def test_a_request_that_cannot_start_fails_alone() -> None:
    deltas = run_engine(FakeWorker(failing=set()), [req("cannot-start"), req("good")])
    (bad,) = by_request(deltas, "cannot-start")
    assert bad.finish_reason is FinishReason.ABORT and "could not start" in bad.error.message
    assert by_request(deltas, "good")[-1].finish_reason is FinishReason.LENGTH


def test_stopping_the_engine_ends_its_requests_with_an_error() -> None:
    published: list[TokenDelta] = []
    core = EngineCore(FakeWorker(set()), FakeDecoder(), 4, 64, publish=published.extend)
    core.start()
    core.submit(req("long", max_tokens=10_000))
    core.stop()
    last = by_request(published, "long")[-1]
    assert last.finish_reason is FinishReason.ABORT
    assert last.error is not None and last.error.kind is FailureKind.UNAVAILABLE


# -- sampler ----------------------------------------------------------------------------------
class Broken:
    def apply(self, logits_row: torch.Tensor) -> None:
        raise RuntimeError("lexer error: too many expressions constructed")


def seeded(seed: int, **kw: object) -> SamplingRow:
    return make_row(1.0, seed, **kw)


def test_a_failing_row_does_not_change_its_neighbours_tokens() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = [sample(logits[i : i + 1], [seeded(i)]).tokens[0] for i in (0, 2)]
    out = sample(logits, [seeded(0), seeded(1, constraint=Broken()), seeded(2)])
    assert set(out.errors) == {1} and out.tokens[1] == -1
    assert [out.tokens[0], out.tokens[2]] == alone


def test_a_huge_top_k_keeps_the_whole_vocabulary_instead_of_overflowing() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [seeded(1, top_k=10**30)])
    assert not out.errors
    assert out.tokens == sample(logits, [seeded(1, top_k=50)]).tokens  # the whole vocabulary


def test_batched_logit_bias_matches_adding_each_entry() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    bias = tuple((t, float(t % 7) - 3) for t in range(0, 50, 3))
    rows = [make_row(0, logit_bias=bias, logprobs=None), make_row(0)]
    expected = logits.clone()
    for t, v in bias:
        expected[0, t] += v
    assert sample(logits, rows).tokens == expected.argmax(-1).tolist()


# -- detokenizer ------------------------------------------------------------------------------
def test_stop_search_work_is_linear_in_the_text_with_long_stop_strings() -> None:
    # The shape: four long stop strings that the text keeps almost matching.
    stops = tuple("a" * (2000 + 500 * k) + "b" for k in range(4))
    matcher = StopMatcher(stops)
    text = "a" * 3000 + "c" + "a" * 3000
    for i in range(0, len(text), 3):  # pieces of a few characters, as tokens arrive
        assert matcher.feed(text[i : i + 3]) is None
    # Amortized KMP: at most two state moves per character per stop string.
    assert matcher.work <= 2 * len(stops) * len(text)
    assert matcher.held_back() == 3000


def test_stop_matcher_finds_the_earliest_match_of_any_stop_string() -> None:
    matcher = StopMatcher(("abcd", "c"))
    assert matcher.feed("xxab") is None and matcher.held_back() == 2
    # Both complete within this piece: the earlier start wins, as str.find over it would say.
    assert matcher.feed("cd") == 2
    matcher = StopMatcher(("abcd", "c"))
    assert matcher.feed("xxabc") == 4  # only "c" is complete yet


def test_detokenizer_holds_back_a_long_stop_prefix_then_stops() -> None:
    stop = "b" * 300 + "c"
    detok = IncrementalDetokenizer(FakeDecoder(), [], (stop,))
    sent = "".join(detok.push(1).text for _ in range(400))  # FakeDecoder: id 1 is "b"
    assert sent == "b" * 100  # the last 300 could still begin the stop string
    result = detok.push(2)  # "c" completes the stop string: nothing held back is sent
    assert result.stopped and result.text == ""
