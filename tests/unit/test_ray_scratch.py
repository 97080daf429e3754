"""An engine replica's scratch dir (genserve.ray.deploy.scratch_dir): held by a lock while its
replica lives, removed by the next replica once its process is gone (killed replicas could
not remove their own, and left their adapters' weights in the node's TMPDIR)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from genserve.ray.deploy import SCRATCH_PREFIX, scratch_dir


@pytest.fixture()
def tmpdir_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def left_by_a_process_that_ended(root: Path) -> Path:
    """A replica's dir whose process exited without removing it, with a file in it."""
    code = (
        "import tempfile, pathlib, sys; tempfile.tempdir = sys.argv[1];"
        "from genserve.ray.deploy import scratch_dir; d, _ = scratch_dir();"
        "pathlib.Path(d, 'adapter.safetensors').write_bytes(b'x' * 1000); print(d)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_a_replica_gets_its_own_locked_dir(tmpdir_root: Path) -> None:
    path, fd = scratch_dir()
    try:
        folder = Path(path)
        assert folder.parent == tmpdir_root and folder.name.startswith(SCRATCH_PREFIX)
        assert (folder / ".lock").is_file()
        assert [p.name for p in tmpdir_root.iterdir()] == [folder.name]  # renamed, not copied
    finally:
        os.close(fd)


def test_the_next_replica_removes_a_dead_ones_dir_and_keeps_a_live_ones(tmpdir_root: Path) -> None:
    dead = left_by_a_process_that_ended(tmpdir_root)
    assert (dead / "adapter.safetensors").is_file()
    live, live_fd = scratch_dir()  # this process lives: its lock is held
    other = tmpdir_root / "genserve-replica-of-an-older-version"  # no lock file: not ours to judge
    other.mkdir()
    try:
        assert not dead.exists()  # removed when `live` was made
        mine, mine_fd = scratch_dir()
        os.close(mine_fd)
        assert Path(live).is_dir() and other.is_dir()
        assert {p.name for p in tmpdir_root.iterdir()} == {
            Path(live).name,
            Path(mine).name,
            other.name,
        }
    finally:
        os.close(live_fd)
