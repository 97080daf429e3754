"""Giving freed host memory back to the operating system (used by loading and the runner), and
reading an accelerator's memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

from genserve.model.sizing import DeviceMemory


def return_freed_memory() -> None:
    """glibc keeps freed heap pages mapped (RSS) unless asked: weights loaded in many mid-sized
    tensors land on the heap, not in mmaps that free() unmaps. Linux/glibc only; best effort."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return
    # musl or another libc: no malloc_trim, the pages come back later or not at all
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def device_memory(device: Any) -> DeviceMemory | None:
    """Free and total memory of a CUDA device (None elsewhere: a CPU's pool is sized in tokens)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(free, total)
