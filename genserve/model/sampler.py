"""Pure sampling over a batch with per-row parameters: (logits, rows) -> tokens (+ logprobs).

A pipeline of small functions, each with OpenAI's or vLLM's definition of its parameter:
logit_bias -> penalties -> masks (min_tokens, grammar) -> greedy or
temperature -> min_p -> top_k -> top_p -> draw. Each row draws its uniform number from its own
torch.Generator and samples by inverse CDF, and every operation works row by row, so a row's
token depends only on its own logits and generator, never on the rows beside it (rule 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from genserve.engine.types import TokenLogprob

NEG_INF = float("-inf")
GREEDY_BELOW = 1e-5


class Constraint(Protocol):
    def apply(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens that may not come next to -inf, in place."""


@dataclass(frozen=True, slots=True)
class SamplingRow:
    temperature: float  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    generator: torch.Generator | None = None
    suppress: tuple[int, ...] = ()  # token ids that may not be drawn (EOS before min_tokens)
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    counts: torch.Tensor | None = None  # [V] how often each token was generated so far
    seen: torch.Tensor | None = None  # [V] bool: in the prompt or generated so far
    constraint: Constraint | None = None  # a grammar: what may come next
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's threshold) dividing by the temperature overflows to inf/NaN;
        # the distribution is a spike on the argmax anyway.
        return self.temperature < GREEDY_BELOW or self.top_k == 1


@dataclass(frozen=True, slots=True)
class SampleOutput:
    tokens: list[int]
    logprobs: list[TokenLogprob | None]


# -- logit processors: each takes one row's logits (a view, modified in place) -------------
def apply_logit_bias(row: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> None:
    """OpenAI: the bias is added to the logit; -100 in effect bans a token, +100 forces it."""
    for token, value in bias:
        row[token] += value


def apply_penalties(row: torch.Tensor, r: SamplingRow) -> None:
    """OpenAI's presence/frequency penalties over generated tokens; vLLM's (HF's) repetition
    penalty over prompt and generated tokens (divide positive logits, multiply negative)."""
    if r.counts is not None and (r.presence_penalty or r.frequency_penalty):
        row -= r.counts * r.frequency_penalty + (r.counts > 0).to(row.dtype) * r.presence_penalty
    if r.seen is not None and r.repetition_penalty != 1.0:
        penalized = torch.where(row > 0, row / r.repetition_penalty, row * r.repetition_penalty)
        row.copy_(torch.where(r.seen, penalized, row))


def apply_masks(row: torch.Tensor, r: SamplingRow) -> None:
    if r.suppress:
        row[list(r.suppress)] = NEG_INF
    if r.constraint is not None:
        r.constraint.apply(row)


def process(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Bias, penalties and masks, row by row, on a copy."""
    out = logits.clone()
    for i, r in enumerate(rows):
        apply_logit_bias(out[i], r.logit_bias)
        apply_penalties(out[i], r)
        apply_masks(out[i], r)
    return out


# -- truncation: on a row's logits after temperature ---------------------------------------
def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """vLLM: drop tokens whose probability is below min_p times the top token's."""
    probs = logits.softmax(-1)
    return probs < min_p * probs.max()


def top_k_top_p_mask(sorted_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """On one row's logits sorted in descending order: True where a token is pruned.

    top_k keeps the k best; top_p keeps the smallest prefix whose probability reaches p
    (the token that crosses p is kept, so at least one token always survives).
    """
    vocab = sorted_logits.shape[-1]
    pruned = torch.arange(vocab, device=sorted_logits.device) >= (top_k or vocab)
    probs = sorted_logits.masked_fill(pruned, NEG_INF).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    return pruned | (before >= top_p)


def sample_from_probs(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF: the first token whose cumulative probability exceeds u."""
    cdf = probs.double().cumsum(-1)
    target = torch.tensor([u], dtype=torch.float64, device=probs.device) * cdf[-1]
    return int(torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1))


def draw(row: torch.Tensor, r: SamplingRow) -> int:
    """One random token from one processed row of logits."""
    u = float(torch.rand(1, generator=r.generator))  # drawn first: one draw per step, always
    row = row / r.temperature
    if r.min_p > 0:
        row = row.masked_fill(min_p_mask(row, r.min_p), NEG_INF)
    if r.top_k == 0 and r.top_p >= 1.0:
        return sample_from_probs(row.softmax(-1), u)
    sorted_logits, order = row.sort(descending=True, stable=True)
    sorted_logits = sorted_logits.masked_fill(
        top_k_top_p_mask(sorted_logits, r.top_k, r.top_p), NEG_INF
    )
    return int(order[sample_from_probs(sorted_logits.softmax(-1), u)])


# -- logprobs -------------------------------------------------------------------------------
def token_logprob(raw_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """From the model's own distribution (vLLM's default): before bias, penalties, masks."""
    logprobs = raw_row.float().log_softmax(-1)
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
    """One token per row. `logits` is [len(rows), vocab] float32 and is not modified."""
    if not rows:
        return SampleOutput([], [])
    processed = process(logits, rows)
    greedy = processed.argmax(-1).tolist()
    tokens = [
        greedy[i] if r.greedy else draw(processed[i], r)  # greedy rows draw nothing
        for i, r in enumerate(rows)
    ]
    logprobs = [
        None if r.logprobs is None else token_logprob(logits[i], tokens[i], r.logprobs)
        for i, r in enumerate(rows)
    ]
    return SampleOutput(tokens, logprobs)
