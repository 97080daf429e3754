"""Folders carried through Ray's object store instead of a shared filesystem: a training
task's inputs and results, an adapter fetched by an engine replica from the control replica.

A Folder is the bytes of every file under a directory, keyed by relative POSIX path. Adapters
and LoRA checkpoints are megabytes, so holding one whole in memory is the simple choice.
No Ray import here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True, slots=True)
class Folder:
    """A directory's files; `path` says where it goes, relative to a root the receiver owns."""

    path: str
    files: dict[str, bytes]


def pack(folder: Path, path: str = "") -> Folder:
    files = {
        f.relative_to(folder).as_posix(): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }
    return Folder(path, files)


def inside(root: Path, relative: str) -> Path:
    """root / relative, refusing a path that would leave root (`..`, absolute): what arrives
    from another node is not trusted to name the receiver's files."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"not a relative path inside the folder: {relative!r}")
    return root.joinpath(*rel.parts)


def unpack(folder: Folder, root: Path) -> Path:
    """Write the folder at root / folder.path, replacing what was there, whole or not at all
    (written beside it, then renamed into place)."""
    target = inside(root, folder.path) if folder.path else root
    staging = target.with_name(target.name + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    for name, data in folder.files.items():
        out = inside(staging, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    staging.mkdir(parents=True, exist_ok=True)  # an empty folder arrives empty
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
