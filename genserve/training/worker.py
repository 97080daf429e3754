"""The training worker: `python -m genserve.training.worker --spec <job-dir>/spec.json`.

A process of its own, apart from the serving engine, so that training shares the CPU (its torch
threads: ServerConfig.training.threads) without sharing the engine's interpreter, and so that a
crash or a SIGKILL of training never takes the server down. It tells the manager what happens
as JSON lines on its original stdout; everything else it or a library prints goes to stderr
(the job's worker.log). torch is imported only once main() runs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

# The messages live in their own module so the trainer can import them without this one; they
# are re-exported here, where the manager and the tests have always found them.
from genserve.training.messages import (  # noqa: F401
    KINDS,
    Checkpointed,
    Failed,
    Finished,
    Message,
    Metrics,
    Started,
    WorkerSpec,
    dump,
    load,
)


class Channel:
    """The message pipe to the manager; the worker ends itself when the manager is gone."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.parent = os.getppid()

    def __call__(self, message: Message) -> None:
        if os.getppid() != self.parent:
            os._exit(3)  # orphaned: the server died; a restart resumes from the last checkpoint
        self.out.write(dump(message) + "\n")
        self.out.flush()


def _channel() -> Channel:
    # Keep the real stdout for messages; point fd 1 at stderr so stray prints land in the log.
    messages = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Channel(messages)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the server dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _pause_on_signal() -> threading.Event:
    """SIGUSR1 (the manager's pause) sets the event; the run stops before its next step. Set
    before torch is imported: until then SIGUSR1 would kill the worker (the job would resume
    from its last checkpoint instead)."""
    requested = threading.Event()
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: requested.set())
    return requested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genserve.training.worker")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = WorkerSpec.model_validate_json(args.spec.read_text())
    emit = _channel()
    _die_with_parent()
    pause = _pause_on_signal()

    import torch

    from genserve.training.trainer import RunPaused, TrainingDataError, train

    torch.set_num_threads(spec.threads)
    try:
        emit(train(spec, emit, pause.is_set))
    except RunPaused:
        return 0  # the Paused message said where; the manager marks the job paused
    except TrainingDataError as e:
        emit(Failed(f"invalid_{e.param}", str(e), e.param))
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            emit(Failed("training_failed", f"{type(e).__name__}: {e}"))
            raise
        # The manager resumes the job from its last checkpoint once space returns.
        emit(Failed("insufficient_storage", f"the disk is full: {e}"))
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the job as its error, then re-raised
        emit(Failed("training_failed", f"{type(e).__name__}: {e}"))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
