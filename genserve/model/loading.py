"""Model refs -> weights, tokenizer and chat template.

A ref is a bundled name (shipped inside the package), a local Hugging Face folder, or a hub
id (only when the hub is reachable). Weights load from safetensors; pickle checkpoints and
`trust_remote_code` are refused unless the operator opts in, because both run code from
the checkpoint's author.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.bundled import bundled_names, bundled_path
from genserve.model.memory import return_freed_memory

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Used when a tokenizer ships no chat template: ChatML, the format of Qwen, SmolLM and our
# starter model. Documented in the README.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(Exception):
    """The ref cannot be served; the message says what to do instead."""


class OutsideModelsDirError(ModelLoadError):
    """An API ref that leads out of the models directory (`..`, absolute, a symlink)."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    path: Path
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    chat_template: str
    eos_token_ids: tuple[int, ...]
    max_context: int
    device: torch.device
    dtype: torch.dtype


def resolve_model_ref(ref: str) -> Path:
    """The local folder that holds `ref`, downloading a hub id only when the hub answers."""
    if ref in bundled_names():
        return bundled_path(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    if HUB_ID.match(ref):
        return _download(ref)
    raise ModelLoadError(
        f"model {ref!r} is not a bundled model ({', '.join(bundled_names()) or 'none'}), "
        "a local folder, or a hub id"
    )


def resolve_api_ref(ref: str, models_dir: Path) -> Path:
    """The folder a ref sent through the API (POST /v1/models) names: a folder inside
    `models_dir`, or a hub id (from the hub's cache, or downloaded when the hub answers).

    Unlike the operator's --model, an API ref is never a path relative to the working
    directory: `outside/evil` is models_dir/outside/evil or the hub's `outside/evil`, and
    nothing else. Symlinks are followed, and must stay inside models_dir too.
    """
    root, target = _inside(ref, models_dir)
    if target.is_dir():
        _check_links(target, root, ref)
        if not (target / "config.json").is_file():
            raise ModelLoadError(f"{ref!r} has no config.json: not a Hugging Face model folder")
        return target
    if HUB_ID.match(ref) and not target.exists():
        return _download(ref)
    raise ModelLoadError(f"no model folder {ref!r} in the models directory")


def resolve_api_adapter(ref: str, models_dir: Path) -> Path:
    """The LoRA adapter folder (peft's adapter_config.json) a ref sent through the API names,
    inside `models_dir` only, by the rules of resolve_api_ref (no hub download: an adapter
    is served from files the operator put there)."""
    root, target = _inside(ref, models_dir)
    if not target.is_dir():
        raise ModelLoadError(f"no adapter folder {ref!r} in the models directory")
    _check_links(target, root, ref)
    if not (target / "adapter_config.json").is_file():
        raise ModelLoadError(f"{ref!r} has no adapter_config.json: not a peft LoRA folder")
    return target


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter (adapter_config.json) rather than a whole model (config.json)."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def _inside(ref: str, models_dir: Path) -> tuple[Path, Path]:
    """(the models dir, the path `ref` names), refused when it resolves outside the dir."""
    root = models_dir.resolve()
    try:
        target = (root / ref).resolve()  # an absolute ref replaces root: refused here
    except (ValueError, OSError) as e:  # a NUL byte, a link loop
        raise ModelLoadError(f"{ref!r} is not a usable path: {e}") from None
    if not target.is_relative_to(root):
        raise OutsideModelsDirError(f"{ref!r} is outside the models directory")
    return root, target


def _check_links(folder: Path, root: Path, ref: str) -> None:
    """A symlinked file in the folder must not reach out of the models directory either."""
    for entry in folder.iterdir():
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise OutsideModelsDirError(f"{ref!r} links to files outside the models directory")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:  # already in the local cache: no network needed
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"{repo_id!r} looks like a Hugging Face hub id, but the hub cannot be reached "
            "(offline). Download it elsewhere and pass the local folder: --model /path/to/model"
        )
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights exist; pickle-only folders are refused unless opted in."""
    if any(path.glob("*.safetensors")):
        return True
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        if allow_pickle:
            log.warning("loading pickle weights from %s (operator opted in)", path)
            return False
        raise ModelLoadError(
            f"{path} holds only pickle weights (.bin/.pt), which can run arbitrary code; "
            "convert them to safetensors, or start the server with --allow-pickle"
        )
    raise ModelLoadError(f"{path} has no weights (*.safetensors)")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def pick_dtype(
    dtype: str, device: torch.device, config: Any, cache_dir: Path | None = None
) -> torch.dtype:
    """`auto` on a CPU: bf16 where the CPU has bf16 units and bf16 kernels are measured
    clearly faster on this model's shapes (genserve.model.hardware.auto_dtype), else fp32;
    models off the fast path stay fp32. On CUDA: the declared half type, else bf16/fp16."""
    from genserve.model import hardware
    from genserve.model.runner import FAST_PATH_TYPES

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        if getattr(config, "model_type", None) not in FAST_PATH_TYPES:
            return torch.float32
        specs = hardware.model_specs(config, 512, 32)[:4]
        return hardware.auto_dtype(device, specs, cache_dir)
    if not torch.cuda.is_bf16_supported():
        return torch.float16
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_model(
    ref: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    name: str | None = None,
    cache_dir: Path | None = None,  # where `--dtype auto`'s measured choice is kept
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_ref(ref)
    safetensors = check_weights(path, allow_pickle)
    dev = pick_device(device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = pick_dtype(dtype, dev, config, cache_dir)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, use_safetensors=safetensors, trust_remote_code=trust_remote_code
    )
    model.to(dev).eval()
    if dev.type == "cpu":
        _own_weights(model)
    return LoadedModel(
        name=name or default_name(ref, path),
        path=path,
        model=model,
        tokenizer=tokenizer,
        chat_template=chat_template_of(tokenizer),
        eos_token_ids=eos_ids(model, tokenizer),
        max_context=int(getattr(config, "max_position_embeddings", 2048) or 2048),
        device=dev,
        dtype=torch_dtype,
    )


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:  # noqa: ANN401
    """The tokenizer of a resolved model folder (the API process loads only this when the
    engine runs in a process of its own)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def chat_template_of(tokenizer: Any) -> str:  # noqa: ANN401
    return tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE


def _own_weights(model: Any) -> None:
    """On CPU, safetensors weights arrive as views of one mapping of the whole file, unmapped
    only once every tensor is gone: the runner's stacked copies could never release the
    originals while the embedding still pinned the file (issue 20: weights held twice). Each
    parameter gets memory of its own (the file's clean pages go back to the page cache).

    The copy runs parallel ops: on any thread but the engine's, the OpenMP pool it leaves there
    slowed decoding 1.7x (genserve.engine.thread), which is why build_served_model loads there."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return_freed_memory()  # and what loading allocated and dropped (its initial weights)


def default_name(ref: str, path: Path) -> str:
    if ref in bundled_names() or HUB_ID.match(ref) and not Path(ref).is_dir():
        return ref
    return path.name


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from the generation config (which may list several) and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    declared = getattr(gen, "eos_token_id", None)
    if isinstance(declared, int):
        ids.add(declared)
    elif declared:
        ids.update(int(i) for i in declared)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
