"""prompt_logprobs with n > 1 score the prompt once, not once per choice: the prompt is the same
for every choice, and each scoring is a prefill that keeps every prompt row's logits and
cannot use the prefix cache. The one scoring is shown on every choice, as before."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from genserve.engine.types import Request, SamplingParams, TokenLogprob
from genserve.runtime.generation import Gathering, Started, _open

PROMPT = (5, 6, 7)
SCORED = (None, TokenLogprob(6, -1.5, ((6, -1.5),)), TokenLogprob(7, -0.5, ((7, -0.5),)))


class Engine:
    """Records the requests a group submits (what the engine would compute)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def open(self, requests: list[Request]) -> object:
        self.requests.extend(requests)
        return SimpleNamespace(close=lambda: None)


def submitted(n: int, best_of: int, stream: bool, prompts: int = 1) -> list[Request]:
    engine = Engine()
    served = SimpleNamespace(engine=engine, fingerprint="fp", token_text=None)
    target = SimpleNamespace(served=served, adapter=None, project="p", id="m")
    rt = SimpleNamespace(config=SimpleNamespace(engine=SimpleNamespace(stream_interval=1)))
    rt.metrics = None
    params = SamplingParams(prompt_logprobs=2, seed=7)
    _open(rt, target, "cmpl", [list(PROMPT)] * prompts, params, n, best_of, "prompt",
          stream=stream)  # fmt: skip
    return engine.requests


@pytest.mark.parametrize(("n", "best_of", "prompts"), [(3, 3, 1), (2, 4, 1), (2, 2, 2)])
def test_an_answer_sent_whole_scores_each_prompt_once(n: int, best_of: int, prompts: int) -> None:
    requests = submitted(n, best_of, stream=False, prompts=prompts)
    scoring = [r for r in requests if r.params.prompt_logprobs is not None]
    assert len(requests) == best_of * prompts
    assert len(scoring) == prompts  # was best_of * prompts
    assert [r.params.prompt_logprobs for r in scoring] == [2] * prompts
    assert len({r.params.seed for r in requests[:best_of]}) == best_of  # seeds still per choice


def test_a_stream_scores_for_every_choice_its_echo_needs_them_first() -> None:
    requests = submitted(3, 3, stream=True)
    assert [r.params.prompt_logprobs for r in requests] == [2, 2, 2]


@pytest.mark.parametrize(("n", "best_of"), [(3, 3), (1, 3)])
def test_every_choice_shows_the_one_scoring(n: int, best_of: int) -> None:
    started = Started("id", 0, "m", "fp", (PROMPT,), n, best_of, None)  # type: ignore[arg-type]
    gathering = Gathering(started)
    gathering.choices[0].prompt_logprobs = SCORED
    # best_of keeps the most likely: make it a sequence that did not score the prompt.
    gathering.choices[-1].logprobs = [TokenLogprob(1, -0.1)]
    for c in gathering.choices[:-1]:
        c.logprobs = [TokenLogprob(1, -9.0)]
    done = gathering.result()
    assert len(done.choices) == n
    assert [c.prompt_logprobs for c in done.choices] == [SCORED] * n
