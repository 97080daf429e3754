"""One server per data dir: the SQLite store, the files and the fine-tuning jobs assume a single
writer (two job managers would both resume a running job; the second server's start-up sweep
would fail the first's background responses). `hold` takes an exclusive flock on
<data_dir>/genserve.lock for the life of the process: the kernel drops it when the process ends
however it ends, so a killed server leaves no stale lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
LOCK_NAME = "genserve.lock"
POLL_S = 0.25


class DataDirBusy(RuntimeError):
    """Another process holds the data dir (and did not let go within the wait)."""


def hold(data_dir: Path, wait_s: float) -> IO[str]:
    """The open lock file, held; keep it open while the server runs. Waits up to `wait_s`
    for a holder to exit (a rolling restart: the old server is draining), then raises."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = (data_dir / LOCK_NAME).open("a+")
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not told and wait_s > 0:  # a start that seems to hang says why, once
                log.warning("%s is in use by another genserve (%s): waiting up to %.0f s "
                            "for it to exit", data_dir, _holder(f), wait_s)  # fmt: skip
                told = True
            if time.monotonic() >= deadline:
                holder = _holder(f)
                f.close()
                raise DataDirBusy(
                    f"{data_dir} is in use by another genserve ({holder}); one server per "
                    "--data-dir: stop it, or give this one another --data-dir"
                ) from None
            time.sleep(POLL_S)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _holder(f: IO[str]) -> str:
    f.seek(0)
    return f.read().strip() or "pid unknown"
