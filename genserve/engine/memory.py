"""Keep a step's freed memory while the engine works; give it back once the engine goes quiet.

glibc keeps what a burst freed in its arenas (one per thread that allocated), so a server's
RSS ratchets up with every unusual request - a big grammar compiled on a worker thread, a wide
best_of batch - and never comes down: `bench/load.py --hostile` saw +15% after one hostile
phase, of which `malloc_trim(0)` returned about 60% when called by hand. The engine calls
`release_free_memory` after a quiet second, never between steps of live traffic.

While it works, the opposite: every step allocates the same large temporaries ([rows, vocab]
float32 logits and probabilities, 6 MiB at 32 rows of a 49k vocabulary; prefill activations)
and frees them. By default glibc serves many of them with a fresh mmap (its threshold starts
at 128 KiB and adapts as mappings are freed), each page-faulted in on first touch (1536 faults
for 6 MiB), and gives back the top of its heap once 128 KiB there are free.
`keep_step_allocations` raises both thresholds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _libc(function: str) -> Callable[..., int] | None:
    """The C library's `function`, where it has one (glibc's malloc tuning: not musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def trimmer() -> Callable[[], None]:
    """malloc_trim(0) where the C library has it (glibc); a no-op elsewhere (musl, macOS)."""
    trim = _libc("malloc_trim")
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0) and None


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its 64 MiB heap size)
TRIM_THRESHOLD = 512 << 20  # free heap kept between steps; the quiet-time trim returns it all


def keep_step_allocations() -> bool:
    """Serve allocations up to 32 MiB from the heap, and keep up to 512 MiB of freed heap mapped,
    so a step reuses the pages the last one freed instead of faulting in fresh ones. Sampling 32
    rows of a 49k vocabulary at top_p 0.95: 2410 page faults and 13.3-13.9 ms a step before, 0
    and 8.9 ms after; at top_k 50, 21.9 -> 13.2 ms (medians, 2-core AMX Xeon VM). Process-wide,
    set once by the engine after its model is loaded (the loader's own trims stay as they
    were); True where the C library took both (glibc)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    took = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and took
