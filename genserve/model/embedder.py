"""Sentence embeddings from a Hugging Face encoder, pooled as its sentence-transformers
config says (mean or CLS), L2-normalised when it has a Normalize module."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.model.loading import check_weights, pick_device, resolve_model_ref


@dataclass(frozen=True, slots=True)
class Pooling:
    mode: str  # "mean" | "cls"
    normalize: bool


def read_pooling(path: Path) -> Pooling:
    mode, normalize = "mean", False
    modules = path / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(e.get("type", "").endswith("Normalize") for e in entries)
        for e in entries:
            cfg = path / e.get("path", "") / "config.json"
            if e.get("type", "").endswith("Pooling") and cfg.is_file():
                mode = (
                    "cls" if json.loads(cfg.read_text()).get("pooling_mode_cls_token") else "mean"
                )
    return Pooling(mode, normalize)


class Embedder:
    def __init__(self, ref: str, device: str = "auto", allow_pickle: bool = False) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_ref(ref)
        safetensors = check_weights(path, allow_pickle)
        self.path = path
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=safetensors).to(self.device)
        self.model.eval()
        self.pooling = read_pooling(path)
        self.dimensions = int(self.model.config.hidden_size)
        self.max_len = int(getattr(self.tokenizer, "model_max_length", 512) or 512)
        self.max_len = min(self.max_len, int(self.model.config.max_position_embeddings))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, truncation=True, max_length=self.max_len) for t in texts]

    @torch.inference_mode()
    def embed(self, batch: Sequence[Sequence[int]]) -> list[list[float]]:
        """Token id lists -> vectors; padded into one forward pass."""
        if any(len(ids) > self.max_len for ids in batch):
            raise ValueError(f"an input is longer than {self.max_len} tokens")
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return self._pool(out.last_hidden_state, mask.to(self.device)).tolist()

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling.mode == "cls":
            vectors = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        if self.pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.float()


def is_encoder(config: Any) -> bool:
    """An encoder (embeddings) rather than a causal LM (generation)."""
    archs = getattr(config, "architectures", None) or []
    return not any(a.endswith("ForCausalLM") or "LMHead" in a for a in archs) and bool(
        getattr(config, "is_decoder", False) is False and config.model_type in ENCODER_TYPES
    )


ENCODER_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "nomic_bert",
    "modernbert",
)
