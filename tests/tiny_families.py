"""Tiny random configs of the decoder-only families served by BatchedHFRunner (issue 17).

Each builds in well under a second: 2 layers, hidden 64, vocabulary 256. Windows are set
smaller than the test prompts, so sliding-window layers actually cut.
"""

from __future__ import annotations

from typing import Any

VOCAB = 256
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 8  # smaller than every test prompt
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1,
    ),
    "gemma3_text": dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
    ),
    "gemma2": dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "phi3": dict(sliding_window=None),
    "smollm3": dict(),
    "olmo2": dict(),
    "gpt_neox": dict(num_key_value_heads=None),
    "mistral": dict(head_dim=16, sliding_window=WINDOW),
}  # fmt: skip


def family_config(family: str, **overrides: Any):  # noqa: ANN201
    """The family's tiny config, or None when the installed transformers lacks the family."""
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        return None
    kw = {**COMMON, **FAMILIES[family], **overrides}
    kw = {k: v for k, v in kw.items() if v is not None or k == "sliding_window"}
    if "layer_types" in kw:  # the pattern repeats over however many layers are asked for
        kw["layer_types"] = [kw["layer_types"][i % 2] for i in range(kw["num_hidden_layers"])]
    return CONFIG_MAPPING[family](**kw)


def build_family(family: str, attn: str = "eager", seed: int = 0, **overrides: Any):  # noqa: ANN201
    import torch
    from transformers import AutoModelForCausalLM

    cfg = family_config(family, **overrides)
    if cfg is None:
        return None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def build_family_dir(folder, family: str, **overrides: Any):  # noqa: ANN001, ANN201
    """A served model folder: the family's tiny config with a real byte-level BPE tokenizer
    (tests/tiny_model.py), safetensors weights. None when transformers lacks the family."""
    import json

    from tests.tiny_model import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = build_family(family, "sdpa", vocab_size=len(tok), pad_token_id=tok.eos_token_id,
                         tie_word_embeddings=True, **ids, **overrides)  # fmt: skip
    if model is None:
        return None
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "genserve-test.json").write_text(json.dumps({"built_by": "tests/tiny_families.py"}))
    return folder
