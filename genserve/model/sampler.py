"""Pure sampling over a batch with per-row parameters: (logits, rows) -> token ids.

Each row draws its uniform number from its own torch.Generator and samples by inverse CDF,
so a row's token depends only on its own logits and its own generator, never on which other
rows share the batch (rule 4 of DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingRow:
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    generator: torch.Generator | None
    suppress: tuple[int, ...] = ()  # token ids that may not be drawn (EOS before min_tokens)


def suppress_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        if row.suppress:
            logits[i, list(row.suppress)] = float("-inf")
    return logits


def scale_by_temperature(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    temps = torch.tensor([r.temperature or 1.0 for r in rows], dtype=logits.dtype)
    return logits / temps.to(logits.device)[:, None]


def top_k_top_p_mask(sorted_logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """On logits sorted in descending order: True where a token is pruned.

    top_k keeps the k best; top_p keeps the smallest prefix whose probability reaches p
    (the token that crosses p is kept, so at least one token always survives).
    """
    vocab = sorted_logits.shape[-1]
    dev = sorted_logits.device
    ks = torch.tensor([r.top_k or vocab for r in rows], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    pruned = ranks >= ks[:, None]
    probs = sorted_logits.masked_fill(pruned, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    ps = torch.tensor([r.top_p for r in rows], dtype=probs.dtype, device=dev)
    return pruned | (before >= ps[:, None])


def draw_uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    draws = [torch.rand(1, generator=r.generator).item() for r in rows]
    return torch.tensor(draws, device=device, dtype=torch.float64)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first token whose cumulative probability exceeds u."""
    cdf = probs.double().cumsum(-1)
    u = uniforms[:, None] * cdf[:, -1:]  # rescale: the cdf's last value is 1 up to rounding
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    return idx[:, 0]


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One token per row. `logits` is [len(rows), vocab] float32 and is not modified."""
    if not rows:
        return []
    logits = suppress_tokens(logits.clone(), rows)
    greedy = logits.argmax(-1)
    random_rows = [i for i, r in enumerate(rows) if r.temperature > 0 and r.top_k != 1]
    if not random_rows:
        return greedy.tolist()
    sub_rows = [rows[i] for i in random_rows]
    sub = scale_by_temperature(logits[random_rows], sub_rows)
    tokens = _sample_rows(sub, sub_rows)
    out = greedy.clone()
    out[random_rows] = tokens
    return out.tolist()


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    uniforms = draw_uniforms(rows, logits.device)
    if all(r.top_k == 0 and r.top_p >= 1.0 for r in rows):
        return sample_from_probs(logits.softmax(-1), uniforms)  # no sort needed
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    sorted_logits = sorted_logits.masked_fill(top_k_top_p_mask(sorted_logits, rows), float("-inf"))
    picked = sample_from_probs(sorted_logits.softmax(-1), uniforms)
    return order.gather(-1, picked[:, None])[:, 0]
