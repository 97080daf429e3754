"""Corpus selection, held-out split and token streams for the `genserve-starter` model.

Shared by `pretrain_starter.py` and `eval_starter.py` so that training and evaluation can
never disagree about which files are held out. The corpus is the running Python's own
standard library (`Lib/`), which every machine with Python has, under the PSF licence.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]

# Whole directories left out: tests are mostly fixtures and assertions, idlelib and
# turtledemo are applications, site-packages is not the standard library.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "turtledemo", "site-packages", "__pycache__"}
)

# What the selection does, in words, for the manifest and the model card.
SELECTION_RULE = (
    "All *.py files under the running Python's stdlib directory (sysconfig 'stdlib'), sorted "
    "by relative POSIX path; excluded: any path with a directory named test, tests, idlelib, "
    "turtledemo, site-packages or __pycache__; config-* directories and _sysconfigdata_*.py "
    "(machine-specific build settings); encodings/* character mapping codecs (files starting "
    'with \'""" Python Character Mapping Codec\': byte tables, not prose or code). '
    "pydoc_data/topics.py is included. A file is held out when "
    "int(sha1(relative path)[:8], 16) % 100 < val_percent."
)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One corpus file: its path relative to the stdlib root, its text and its split."""

    rel: str
    text: str
    sha256: str
    heldout: bool


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def is_heldout(rel: str, val_percent: int) -> bool:
    # Hashing the path (not the content, not a random draw) keeps the split stable across
    # machines and runs, and independent of file order or size.
    bucket = int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8], 16) % 100
    return bucket < val_percent


def _excluded(rel_parts: tuple[str, ...]) -> bool:
    if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel_parts[:-1]):
        return True
    return rel_parts[-1].startswith("_sysconfigdata_")


def _is_codec_table(rel: str, text: str) -> bool:
    return rel.startswith("encodings/") and text.startswith('""" Python Character Mapping Codec')


def load_corpus(val_percent: int, root: Path | None = None) -> list[SourceFile]:
    """The exact, sorted file selection described by SELECTION_RULE."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel_path = path.relative_to(root)
        rel = rel_path.as_posix()
        if _excluded(rel_path.parts):
            continue
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if _is_codec_table(rel, text):
            continue
        digest = hashlib.sha256(raw).hexdigest()
        files.append(SourceFile(rel, text, digest, is_heldout(rel, val_percent)))
    return files


def manifest(files: list[SourceFile], val_percent: int) -> dict:
    """Everything needed to check that someone else selected the same corpus."""
    return {
        "corpus": "Python standard library source (Lib/*.py) incl. pydoc_data/topics.py",
        "licence": "PSF License Agreement (Python Software Foundation License Version 2)",
        "python": python_version(),
        "python_build": sys.version,
        "selection_rule": SELECTION_RULE,
        "val_percent": val_percent,
        "n_files": len(files),
        "n_heldout": sum(f.heldout for f in files),
        "bytes_train": sum(len(f.text.encode()) for f in files if not f.heldout),
        "bytes_heldout": sum(len(f.text.encode()) for f in files if f.heldout),
        "files": [{"path": f.rel, "sha256": f.sha256, "heldout": f.heldout} for f in files],
    }


def chatml(user: str, assistant: str) -> str:
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


def _topic_chats(text: str) -> Iterator[str]:
    # pydoc_data/topics.py is one dict literal: topic name -> reference text.
    topics = ast.literal_eval(text.split("=", 1)[1].strip())
    for name in sorted(topics):
        yield chatml(f"Explain the Python topic '{name}'.", topics[name].strip())


def _function_chats(text: str, max_chars: int) -> Iterator[str]:
    """Documented functions as (docstring summary -> code) pairs, so the chat tokens are
    trained and a chat request gets Python back instead of noise."""
    try:
        tree = ast.parse(text)
    except SyntaxError:  # a few stdlib files target other grammars (lib2to3 fixtures)
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        summary = doc.strip().splitlines()[0].strip() if doc else ""
        source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
        if len(summary) >= 20 and len(source) <= max_chars:
            yield chatml(f"Write a Python function `{node.name}`: {summary}", source)


def chat_documents(files: list[SourceFile], max_chars: int = 400) -> list[str]:
    """ChatML documents derived from training files only (held-out files never leak)."""
    docs: list[str] = []
    for f in files:
        if f.heldout:
            continue
        if f.rel == "pydoc_data/topics.py":
            docs.extend(_topic_chats(f.text))
        else:
            docs.extend(_function_chats(f.text, max_chars))
    return docs


def token_stream(encode_batch, docs: list[str], eot_id: int) -> torch.Tensor:
    """Documents packed end to end, each followed by <|endoftext|>, as int32 ids."""
    ids: list[int] = []
    for enc in encode_batch(docs):
        ids.extend(enc)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.int32)


def windows(stream: torch.Tensor, seq_len: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of seq_len + 1 ids overlapping by one id, so every id after the
    first is predicted exactly once (the held-out metric's definition)."""
    for start in range(0, len(stream) - 1, seq_len):
        yield stream[start : start + seq_len + 1]


@torch.no_grad()
def mean_nll(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, bf16: bool) -> float:
    """Mean next-token negative log-likelihood (nats) over the whole stream."""
    model.eval()
    total, count = 0.0, 0
    for window in windows(stream, seq_len):
        ids = window.long().unsqueeze(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        )
        total += nll.item()
        count += ids.shape[1] - 1
    return total / count
