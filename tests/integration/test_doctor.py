"""`genserve doctor` prints what `genserve serve` decides at start-up: with no options, what a
default server decides; with serve's options or environment, what that server decides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from genserve.config import ServerConfig


def doctor(model: Path, data_dir: Path, **env: str) -> str:
    cmd = [sys.executable, "-m", "genserve.cli", "doctor", "--model", str(model),
           "--data-dir", str(data_dir)]  # fmt: skip
    # serve's own environment only as given here: a run under GENSERVE_DTYPE=auto (the whole
    # suite in bf16) still asks the defaults test about a default server
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**inherited, **env}
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_doctor_defaults_are_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = doctor(tiny_model_dir, tmp_path)
    default = ServerConfig().model  # serve's defaults (its options are built from them)
    assert f"dtype {default.dtype} -> torch.float32, quantization {default.quantization}" in out
    assert "kernels (measured" in out  # the kernel table follows, for that dtype


def test_doctor_reads_serves_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GENSERVE_DTYPE sets serve's --dtype: doctor, asked about that server, reads it too."""
    out = doctor(tiny_model_dir, tmp_path, GENSERVE_DTYPE="bfloat16")
    assert "dtype bfloat16 -> torch.bfloat16" in out
