"""Models shipped inside the package: folders beside this file. Plain Python, no torch."""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent


def bundled_names() -> list[str]:
    """Base models: folders with a config.json."""
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def bundled_adapters(base_ref: str) -> list[tuple[str, Path]]:
    """LoRA adapters shipped for a bundled base: (model id, folder), served beside it."""
    out = []
    for p in sorted(BUNDLED_DIR.iterdir()):
        cfg = p / "adapter_config.json"
        if cfg.is_file() and _base_of(cfg) == base_ref:
            out.append((p.name, p))
    return out


def _base_of(adapter_config: Path) -> str | None:
    try:
        return json.loads(adapter_config.read_text()).get("genserve_base")
    except (OSError, ValueError):
        return None
