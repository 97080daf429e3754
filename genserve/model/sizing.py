"""How much memory a model will take, read from its files before loading (no torch needed):
safetensors headers give every tensor's shape, config.json the KV cache's."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from genserve.config import EngineConfig

DEFAULT_MAX_LEN = 2048  # per-sequence context when the operator does not say
FP32 = 4
# A layer's cache is one tensor [kv_heads, tokens, head_dim]; GPU kernels (FlexAttention's
# Triton template among them) index it with 32-bit offsets, and refused to build for a
# 261M-token pool that a tiny model's share of an H200 gave (8.4e9 elements a layer).
INDEX_LIMIT = 2**31
SPARE_ROWS = 4096  # rows the runner adds past the pool (warm-up rows), with room to spare
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_shape(cfg: EngineConfig, model_context: int) -> tuple[int, int]:
    """(slots, tokens per slot) that fit the KV-cache budget."""
    max_len = min(cfg.max_model_len or DEFAULT_MAX_LEN, model_context)
    budget = cfg.kv_cache_tokens or cfg.max_batch_size * max_len
    slots = min(cfg.max_batch_size, budget // max_len)
    if slots < 1:
        raise ValueError(
            f"--kv-cache-tokens {budget} cannot hold one sequence of {max_len} tokens; "
            "raise it or lower --max-model-len"
        )
    return slots, max_len


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """An accelerator's memory once the weights are loaded (torch.cuda.mem_get_info)."""

    free: int
    total: int


def pool_tokens(
    cfg: EngineConfig,
    max_len: int,
    device: DeviceMemory | None = None,
    bytes_per_token: int = 0,
    headroom: int = 0,
    row_elements: int = 1,
) -> int:
    """Tokens of the paged KV pool: --kv-cache-tokens; else, on a GPU (`device`), what fits
    in --gpu-memory-fraction of its memory beside what is already used and `headroom` (the
    runner's transient copies and a step's activations), at most what a layer's cache of
    `row_elements` (kv_heads x head_dim) a token can hold under 32-bit offsets; else what
    static slots of max_len for max_batch_size sequences held (the same memory as before
    paging)."""
    if cfg.kv_cache_tokens:
        return cfg.kv_cache_tokens
    if device is None or bytes_per_token <= 0:
        return cfg.max_batch_size * max_len
    used = device.total - device.free
    budget = int(cfg.gpu_memory_fraction * device.total) - used - headroom
    tokens = min(budget // bytes_per_token, INDEX_LIMIT // row_elements - SPARE_ROWS)
    if tokens < max_len:
        raise ValueError(
            f"--gpu-memory-fraction {cfg.gpu_memory_fraction} leaves room for {max(tokens, 0)} "
            f"KV tokens ({used / 2**30:.1f} of {device.total / 2**30:.1f} GiB in use), less than "
            f"one sequence of {max_len}: raise it or lower --max-model-len"
        )
    return tokens


def element_bytes(dtype: str, on_gpu: bool) -> int:
    """Bytes per weight and KV element for --dtype. `auto` is half precision on a GPU
    (loading.pick_dtype); on a CPU it picks bf16 only where measured faster, so fp32 is
    counted there (the budget errs on the side of refusing)."""
    if dtype == "auto":
        return 2 if on_gpu else FP32
    return ELEMENT_BYTES[dtype]


def model_bytes(folder: Path, kind: str, dtype: str, on_gpu: bool, engine: EngineConfig) -> int:
    """A model's memory on its device once served: weights at their dtype, held once on a GPU
    (the runner frees the originals of its stacked copies; F.linear reads them as they are),
    twice on a CPU (measured kernels may keep a oneDNN-prepacked and a plain copy of a weight),
    plus the KV cache at the same dtype. Embedding models: their weights."""
    elem = element_bytes(dtype, on_gpu)
    weights = weight_bytes(folder, elem)
    if kind == "embed":
        return weights
    return (1 if on_gpu else 2) * weights + kv_cache_bytes(folder, engine, elem)


def weight_count(folder: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers alone."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def weight_bytes(folder: Path, elem: int = FP32) -> int:
    """Bytes of the weights once loaded (fp32 on CPU); pickle-only folders by file size."""
    count = weight_count(folder)
    if count:
        return count * elem
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def kv_cache_bytes(folder: Path, engine: EngineConfig, elem: int = FP32) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    heads = cfg.get("num_attention_heads", 1)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(heads, 1)
    layers = cfg.get("num_hidden_layers", 0)
    context = cfg.get("max_position_embeddings") or DEFAULT_MAX_LEN
    _, max_len = cache_shape(engine, context)
    return 2 * layers * kv_heads * head_dim * elem * pool_tokens(engine, max_len)
