"""What the training worker and the manager say to each other: the job's spec (a JSON file)
and the messages on the worker's stdout, one JSON line each."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DEFAULT_BETA = 0.1  # DPO's beta when a job says "auto": where the DPO paper and TRL start
PAUSE_DIR = "paused"  # under a job's out_dir: the state its last pause saved (one, replaced)


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
    device: str = "auto"  # the server's --device: auto trains on a GPU when there is one
    method: Literal["supervised", "dpo"] = "supervised"  # a spec written before DPO: supervised
    beta: float = DEFAULT_BETA  # dpo only: how strongly the policy is held to the reference


# --- what the worker tells the manager, one JSON line each -----------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    total_steps: int
    examples: int
    valid_examples: int
    truncated: int  # examples cut to max_len
    start_step: int  # > 0 when resumed from a checkpoint
    skipped: int = 0  # examples with nothing left to learn once cut to max_len
    device: str = "cpu"  # where it trains ("cuda:0", "cpu")
    precision: str = "float32"  # "bfloat16 autocast" on a GPU that has bf16 units


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
class Paused:
    """The run stopped on request (POST .../pause) after `step`, its state saved in `path`
    (not one of the job's checkpoints: a resume point between them)."""

    step: int
    path: str


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str
    param: str | None = None


Message = Started | Metrics | Checkpointed | Finished | Paused | Failed
KINDS: dict[str, type] = {
    c.__name__: c for c in (Started, Metrics, Checkpointed, Finished, Paused, Failed)
}


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
