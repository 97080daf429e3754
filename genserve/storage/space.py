"""Telling a full disk from other storage failures: it is the operator's to fix, it passes
when space returns, and a client should hear 507 (insufficient storage), not 500."""

from __future__ import annotations

import errno
import sqlite3

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a quota) from a file write, or SQLite's SQLITE_FULL ("database or disk is
    full"), anywhere in the exception's cause chain."""
    seen = 0
    while exc is not None and seen < 8:  # a chain is short; a cycle must not loop forever
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and (
            getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(exc)
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
