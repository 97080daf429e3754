"""Which runner serves a model: the one module that knows every runner (runner.py's
hand-written Llama path, hf_batched.py's batched transformers path, and the one-at-a-time
fallback), so that none of them imports another's dispatcher."""

from __future__ import annotations

import logging
from typing import Any

from genserve.engine.kv_blocks import PagedShape
from genserve.model.hardware import KernelPolicy
from genserve.model.hf_batched import BatchedHFRunner, unsupported_reason
from genserve.model.runner import HFRunner, LlamaRunner, Runner, fast_path_supported

log = logging.getLogger(__name__)


def make_runner(
    model: Any,
    num_slots: int,
    max_len: int,
    fast_path: bool = True,
    batch_invariant: bool = True,
    policy: KernelPolicy | None = None,
    paged: PagedShape | None = None,
    compile_decode: bool = False,
    adaptive_threads: bool = True,
) -> Runner:
    """LlamaRunner where it applies (hand-written, fastest measured), else BatchedHFRunner
    (transformers' modules, our batched attention and KV slots), else HFRunner (one sequence
    at a time) for models that cannot route attention through transformers' interface.
    `paged`: the block pool the Llama runner keeps (the others keep num_slots static slots)."""
    kind = model.config.model_type
    if fast_path and fast_path_supported(model.config, max_len):
        log.info("model type %s: LlamaRunner (the hand-written Llama-family path)", kind)
        if paged is None:
            return LlamaRunner(
                model, num_slots, max_len, batch_invariant, policy,
                compile_decode=compile_decode, adaptive_threads=adaptive_threads,
            )  # fmt: skip
        return LlamaRunner(
            model, paged.max_seqs, max_len, batch_invariant, policy, paged.num_blocks,
            paged.block_size, compile_decode, adaptive_threads=adaptive_threads,
        )  # fmt: skip
    reason = unsupported_reason(model)
    if reason is None:
        log.info("model type %s: BatchedHFRunner (transformers' modules, batched)", kind)
        return BatchedHFRunner(model, num_slots, max_len, batch_invariant)
    log.info("model type %s: HFRunner, one sequence at a time: %s", kind, reason)
    return HFRunner(model, num_slots, max_len)
