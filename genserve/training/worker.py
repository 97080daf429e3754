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
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict


class WorkerSpec(BaseModel):
    """Everything one run of the worker needs; persisted as <job-dir>/spec.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    base_path: str  # the base model's local HF folder (safetensors)
    chat_template: str  # the served model's template: training renders chats as serving does
    train_file: str
    valid_file: str | None = None
    n_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    max_len: int  # examples are cut to this many tokens
    out_dir: str  # <data_dir>/jobs/<job-id>: checkpoints/ and adapter/ go here
    resume_dir: str | None = None  # a checkpoint folder to continue from
    threads: int = 1


# --- what the worker tells the manager, one JSON line each -----------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    total_steps: int
    examples: int
    valid_examples: int
    truncated: int  # examples cut to max_len
    start_step: int  # > 0 when resumed from a checkpoint
    skipped: int = 0  # examples with nothing left to learn once cut to max_len


@dataclass(frozen=True, slots=True)
class Metrics:
    step: int
    data: dict[str, Any] = field(default_factory=dict)  # OpenAI's metrics event `data`


@dataclass(frozen=True, slots=True)
class Checkpointed:
    step: int
    epoch: int
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finished:
    trained_tokens: int
    adapter_dir: str


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str
    param: str | None = None


Message = Started | Metrics | Checkpointed | Finished | Failed
KINDS: dict[str, type] = {c.__name__: c for c in (Started, Metrics, Checkpointed, Finished, Failed)}


def dump(message: Message) -> str:
    return json.dumps({"kind": type(message).__name__, **asdict(message)})


def load(line: str | bytes) -> Message:
    """Parse one line; ValueError if it is not a message (the manager logs and skips it)."""
    try:
        obj = json.loads(line)
        kind = KINDS[obj.pop("kind")]
        return kind(**obj)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a worker message: {line!r:.200}") from e


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genserve.training.worker")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = WorkerSpec.model_validate_json(args.spec.read_text())
    emit = _channel()
    _die_with_parent()

    import torch

    from genserve.training.trainer import TrainingDataError, train

    torch.set_num_threads(spec.threads)
    try:
        emit(train(spec, emit))
    except TrainingDataError as e:
        emit(Failed("invalid_training_file", str(e), e.param))
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
