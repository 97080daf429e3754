"""Devices the model-side unit tests run on: the CPU always, CUDA where this machine has it
(scripts/gpu_smoke.sh runs them there), and `meta` for placement: a meta tensor meeting a
tensor on another device raises, and it holds no data, so any copy to the host that does not
go through the code's named sync points raises too. Meta is how a machine without a GPU
catches bookkeeping built on the CPU beside logits that live elsewhere."""

from __future__ import annotations

import torch

ACCELERATORS = ["cuda"] if torch.cuda.is_available() else []
COMPUTE = ["cpu", *ACCELERATORS]  # devices that run real numbers
PLACEMENT = ["meta", *ACCELERATORS]  # devices where the CPU default would be the wrong one
