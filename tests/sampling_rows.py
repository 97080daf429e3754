"""SamplingRow for sampler tests, from keyword arguments as a request would set them."""

from __future__ import annotations

import dataclasses

import torch

from genserve.engine.types import SamplingParams
from genserve.model.sampler import SamplingRow

PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def make_row(temperature: float = 1.0, seed: int | None = None, **kw: object) -> SamplingRow:
    """SamplingParams' fields go to the params, the rest (counts, seen, suppress, constraint)
    to the row; a seed gives the row its own generator, as the worker does."""
    params = {k: v for k, v in kw.items() if k in PARAM_FIELDS}
    state = {k: v for k, v in kw.items() if k not in PARAM_FIELDS}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(temperature=temperature, **params), generator=gen, **state)
