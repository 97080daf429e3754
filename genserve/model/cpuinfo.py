"""What the CPU says it is: read by hardware.py (features, cache keys) and native.py (which
build of the native kernel fits this machine)."""

from __future__ import annotations

import platform
from pathlib import Path


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    try:
        text = path.read_text()
    except OSError:  # not Linux: the model name from platform, no flags (measurement decides)
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags
