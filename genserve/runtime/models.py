"""What is served: base models, their LoRA adapters, embeddings models, and models loading.

Plain records; genserve.api.cards turns each into OpenAI's model object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve.engine.batcher import MicroBatcher
from genserve.engine.client import AsyncEngine
from genserve.runtime.grammar_check import GrammarChecks
from genserve.runtime.tokens import TokenText


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter (peft format) served on top of a loaded base model."""

    id: str  # "ft:<base>:<suffix>:<job-id>"
    base: str  # id of the served base model
    path: Path  # folder with adapter_config.json and adapter_model.safetensors
    created: int
    owned_by: str = "genserve"
    project: str | None = None  # a fine-tuned model's owner; None: shared (operator's adapters)
    checkpoint_of: str | None = None  # a checkpoint's model: the fine-tuned model it belongs to

    def visible_to(self, project: str) -> bool:
        return self.project is None or self.project == project


@dataclass(slots=True)
class ModelSettings:
    """Serving defaults an operator sets through PUT/PATCH /v1/models/{id}; persisted."""

    defaults: dict[str, Any] = field(default_factory=dict)  # sampling fields a request omits
    chat_template: str | None = None  # None: the tokenizer's own
    aliases: list[str] = field(default_factory=list)
    max_context: int | None = None  # None: the engine's whole context

    def as_dict(self) -> dict:
        return {
            "defaults": dict(self.defaults),
            "chat_template": self.chat_template,
            "aliases": list(self.aliases),
            "max_context": self.max_context,
        }


@dataclass(slots=True)
class ServedModel:
    id: str
    created: int
    engine: AsyncEngine
    path: Path  # the base model's folder (fine-tuning reads the weights from it)
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template
    chat_template: str
    max_len: int
    fingerprint: str  # build + weights + dtype + device: same fingerprint, same seeded output
    vocab_size: int  # width of the model's logits (may exceed the tokenizer's length)
    token_text: TokenText
    grammars: GrammarChecks  # a request's grammar, checked before the engine gets it
    owned_by: str = "genserve"
    settings: ModelSettings = field(default_factory=ModelSettings)
    ref: str = ""  # what it was loaded from
    # UTF-8 bytes of the vocabulary's longest token (0: unknown). A text of B bytes has at
    # least B / max_token_bytes tokens, so a prompt too long for the context is refused
    # before the tokenizer spends seconds and hundreds of MB on it (genserve.runtime.limits).
    max_token_bytes: int = 0

    def stop(self) -> None:
        """Stop the engine (what is in flight ends with an error) and the grammar checks.
        Blocks: run it off the event loop. The helper is told first: it exits while the
        engine stops."""
        self.grammars.close()
        self.engine.stop()

    @property
    def context_limit(self) -> int:
        """Tokens a request may use: the engine's context, or less if the operator said so."""
        limit = self.settings.max_context
        return min(limit, self.max_len) if limit else self.max_len

    @property
    def template(self) -> str:
        return self.settings.chat_template or self.chat_template


@dataclass(slots=True)
class EmbeddingModel:
    id: str
    created: int
    batcher: MicroBatcher
    tokenize: Any  # list[str] -> list[list[int]], truncating to max_len
    dimensions: int
    max_len: int
    vocab_size: int
    owned_by: str = "genserve"


@dataclass(frozen=True, slots=True)
class PendingModel:
    """A model registered through the API that is loading, or failed to load (and says why)."""

    id: str
    created: int
    kind: str  # "generate" | "embed"
    ref: str
    status: str = "loading"  # "loading" | "failed"
    error: str | None = None
    aliases: tuple[str, ...] = ()  # taken while it loads: two loads may not claim one name


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` names: a base model, maybe with one of its adapters."""

    served: ServedModel
    adapter: str | None  # adapter id, or None for the base model itself
    project: str = ""  # who asks: the engine shares admission fairly between projects

    @property
    def id(self) -> str:
        return self.adapter or self.served.id


Listed = ServedModel | AdapterSpec | EmbeddingModel | PendingModel  # what GET /v1/models shows
