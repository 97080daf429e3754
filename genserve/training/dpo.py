"""Direct Preference Optimization (Rafailov et al., 2023) for a LoRA-adapted model.

A batch holds n preference pairs as 2n rows: the n preferred outputs, then the n others, each
after its prompt with labels on the output only (dataset.encode_pair). The policy is the model
with its adapter; the reference is the same model with the adapter disabled, so it is the
frozen base at no memory cost. Each output's implicit reward is beta * (log pi - log ref)
summed over its tokens, and the loss is -logsigmoid(reward_chosen - reward_rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from genserve.training.dataset import IGNORE

if TYPE_CHECKING:  # the trainer imports this module: the type alone goes the other way
    from genserve.training.trainer import Batch


@dataclass(frozen=True, slots=True)
class PairScores:
    """Sums over a batch's pairs, so that batches add up to a whole validation set."""

    loss: torch.Tensor  # summed loss; differentiable through the policy pass
    correct: int  # pairs whose preferred output earned the higher reward
    margin: float  # summed reward_chosen - reward_rejected
    pairs: int


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """Each row's log-probability of its learned tokens (labels != IGNORE), summed."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits, target = logits[:, :-1].float(), batch.labels[:, 1:]
    # -log p of each target token; a position labelled IGNORE (prompt, padding) adds 0.
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return -nll.sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> PairScores:
    """policy, reference: [2n] sequence log-probabilities, the n chosen rows first."""
    rewards = beta * (policy - reference)
    chosen, rejected = rewards.chunk(2)
    margins = chosen - rejected
    losses = -F.logsigmoid(margins)
    detached = margins.detach()
    return PairScores(
        losses.sum(), int((detached > 0).sum()), float(detached.sum()), int(margins.numel())
    )


def pair_scores(model, batch: Batch, beta: float) -> PairScores:
    """The DPO loss of a batch of pairs: the policy pass (with gradients where enabled), and
    the reference pass through the same weights with the LoRA adapter switched off."""
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logps(model, batch)
    policy = sequence_logps(model, batch)
    return dpo_loss(policy, reference, beta)
