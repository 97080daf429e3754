"""Give freed heap memory back to the system once the engine goes quiet.

glibc keeps what a burst freed in its arenas (one per thread that allocated), so a server's
RSS ratchets up with every unusual request - a big grammar compiled on a worker thread, a wide
best_of batch - and never comes down: `bench/load.py --hostile` saw +15% after one hostile
phase, of which `malloc_trim(0)` returned about 60% when called by hand. The engine calls
`release_free_memory` after a quiet second, never between steps of live traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def trimmer() -> Callable[[], None]:
    """malloc_trim(0) where the C library has it (glibc); a no-op elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0) and None
