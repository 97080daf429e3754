"""LoRA fine-tuning with peft: the worker's body. Supervised (cross-entropy on the learned
tokens) or DPO (genserve.training.dpo: preference pairs against the adapter-free reference).
On a GPU when the server's --device finds one (bf16 autocast where it has bf16), else on the
CPU with the worker's share of torch threads.

Reproducible by construction: the seed sets the LoRA initialisation, each epoch shuffles with
its own generator (seed + epoch), dropout is 0 and the learning rate is a pure function of the
step. A checkpoint holds the adapter, the optimizer state (safetensors, no pickle) and the step,
so a run resumed from it computes the same losses the uninterrupted run would have. A pause
(the worker's SIGUSR1) saves the same state between two steps of an epoch, with how many of the
epoch's batches are done, and ends the run; resumed, it skips those batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from genserve.training.dataset import (
    IGNORE,
    DatasetError,
    Encoded,
    EncodedPair,
    TemplateError,
    encode_row,
    method_mismatch,
    read_examples,
    read_format,
)
from genserve.training.dpo import PairScores, pair_scores
from genserve.training.messages import (
    PAUSE_DIR,
    Checkpointed,
    Finished,
    Message,
    Metrics,
    Paused,
    Started,
    WorkerSpec,
)

# LoRA targets: every attention and MLP projection, under each family's names. Llama-shaped
# models (Qwen3, Gemma, Mistral, OLMo 2, SmolLM3; Qwen3-MoE's attention, its experts not being
# Linear modules) use the first seven; Phi-3 fuses qkv_proj and gate_up_proj; GPT-NeoX names
# them query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
Emit = Callable[[Message], None]
Row = Encoded | EncodedPair  # one supervised example, or one preference pair


class TrainingDataError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a run stands; what a checkpoint's state.json records."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    trained_tokens: int = 0
    batches_done: int = 0  # of the epoch after `epoch`: > 0 only in a pause's state


class RunPaused(Exception):  # noqa: N818 - not an error: the run stopped where it was asked to
    """Raised out of the epoch loop once a pause's state is saved and announced."""


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tokens: int  # real (unpadded) tokens

    def to(self, device: torch.device) -> Batch:
        move = dict(device=device, non_blocking=True)
        return Batch(self.input_ids.to(**move), self.attention_mask.to(**move),
                     self.labels.to(**move), self.tokens)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a job trains and in what precision, chosen as the server chooses its device: on
    a GPU when --device is auto and one is there, with bf16 autocast where the GPU has bf16
    units (the LoRA and optimizer state stay fp32); on a CPU, fp32."""

    device: torch.device
    autocast: torch.dtype | None = None  # None: fp32 throughout

    @property
    def precision(self) -> str:
        if self.autocast is None:
            return "float32"
        return f"{str(self.autocast).removeprefix('torch.')} autocast"

    def compute(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def placement(device: str) -> Placement:
    from genserve.model.loading import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return Placement(dev, torch.bfloat16)
    return Placement(dev)


@dataclass(frozen=True, slots=True)
class Run:
    """One run of the worker: what every epoch reads."""

    spec: WorkerSpec
    model: object  # peft PeftModel
    optimizer: torch.optim.Optimizer
    rows: list[Row]
    valid: list[Row]
    pad_id: int
    total_steps: int
    emit: Emit
    place: Placement
    objective: Objective
    pause_requested: Callable[[], bool] = lambda: False


@dataclass(frozen=True, slots=True)
class Scores:
    loss: float
    accuracy: float  # mean token accuracy on the learned tokens


@dataclass(frozen=True, slots=True)
class Data:
    rows: list[Row]  # examples with at least one token to learn (on both sides of a pair)
    truncated: int  # examples cut to max_len
    skipped: int  # examples left with nothing to learn once cut


def load_data(spec: WorkerSpec, tokenizer, path: str, param: str) -> Data:
    try:
        examples = read_examples(Path(path))
    except DatasetError as e:
        raise TrainingDataError(str(e), param) from e
    except OSError as e:  # its words, not the server's path
        raise TrainingDataError(f"{param} could not be read: {e.strerror}", param) from e
    # The manager checked this before queueing the job; the file is read again here, so the
    # worker never trains one method on the other's data.
    if problem := method_mismatch(spec.method, read_format(examples), param):
        raise TrainingDataError(problem, param)
    try:
        encoded = [encode_row(tokenizer, spec.chat_template, e, spec.max_len) for e in examples]
    except TemplateError as e:
        raise TrainingDataError(str(e), param) from e
    rows = [e for e in encoded if e.learnable]
    if not rows:
        raise TrainingDataError(
            f"no example in {param} has a token to learn within {spec.max_len} tokens", param
        )
    truncated = sum(1 for e in encoded if e.truncated)
    return Data(rows, truncated, len(encoded) - len(rows))


def build_model(spec: WorkerSpec, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)  # LoRA's A matrices are drawn now
    base = AutoModelForCausalLM.from_pretrained(
        spec.base_path, dtype=torch.float32, use_safetensors=True
    )
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=lora_targets(base),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base.to(device), config)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The family's target names that are Linear modules of this model (peft wraps no other)."""
    wanted = FAMILY_TARGETS.get(model.config.model_type, TARGETS)
    present = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    }
    targets = [t for t in wanted if t in present]
    if not targets:
        raise ValueError(f"the model has none of the LoRA target modules {', '.join(wanted)}")
    return targets


def collate(rows: list[Encoded], pad_id: int) -> Batch:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return Batch(ids, mask, labels, int(mask.sum()))


def forward(model, batch: Batch) -> tuple[torch.Tensor, int, int]:
    """(summed loss over learned tokens, learned tokens, correctly predicted learned tokens)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits, target = logits[:, :-1].float(), batch.labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    learned = target != IGNORE
    correct = int((logits.argmax(-1)[learned] == target[learned]).sum())
    return loss, int(learned.sum()), correct


def evaluate(model, rows: list[Encoded], batch_size: int, pad_id: int, place: Placement) -> Scores:
    model.eval()
    total, count, correct = 0.0, 0, 0
    with torch.no_grad(), place.compute():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], pad_id).to(place.device)
            loss, n, c = forward(model, batch)
            total, count, correct = total + float(loss), count + n, correct + c
    model.train()
    return Scores(total / max(count, 1), correct / max(count, 1))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step on `loss` at learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, batch: Batch, lr: float, place: Placement) -> Scores:
    with place.compute():
        loss_sum, count, correct = forward(model, batch)
    _descend(optimizer, loss_sum / max(count, 1), lr)
    return Scores(float(loss_sum.detach()) / max(count, 1), correct / max(count, 1))


# --- what a method trains --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One optimizer step's outcome: its scores for the metrics event, the tokens it read."""

    scores: dict[str, float]
    tokens: int


class Objective(Protocol):
    """How a method turns a batch of rows into one optimizer step, and scores validation."""

    def step(self, run: Run, rows: list[Row], lr: float) -> Step: ...

    def validate(self, run: Run) -> dict[str, float]: ...


class Supervised:
    """Cross-entropy on each example's learned tokens (assistant turns, completions)."""

    def step(self, run: Run, rows: list[Row], lr: float) -> Step:
        batch = collate(rows, run.pad_id).to(run.place.device)
        scores = train_step(run.model, run.optimizer, batch, lr, run.place)
        metrics = {"train_loss": scores.loss, "train_mean_token_accuracy": scores.accuracy}
        return Step(metrics, batch.tokens)

    def validate(self, run: Run) -> dict[str, float]:
        return validation_scores(run)


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> Batch:
    """n pairs as 2n rows, the preferred outputs first (the order dpo_loss reads)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def _pair_metrics(prefix: str, scores: PairScores) -> dict[str, float]:
    n = max(scores.pairs, 1)
    return {
        f"{prefix}_loss": float(scores.loss.detach()) / n,
        # The share of pairs whose preferred output the model now rewards more than the other.
        f"{prefix}_mean_reward_accuracy": scores.correct / n,
    }


@dataclass(frozen=True, slots=True)
class Preference:
    """DPO on preference pairs (genserve.training.dpo)."""

    beta: float

    def step(self, run: Run, rows: list[Row], lr: float) -> Step:
        batch = pair_batch(rows, run.pad_id).to(run.place.device)
        with run.place.compute():
            scores = pair_scores(run.model, batch, self.beta)
        _descend(run.optimizer, scores.loss / max(scores.pairs, 1), lr)
        metrics = _pair_metrics("train", scores)
        metrics["train_mean_reward_margin"] = scores.margin / max(scores.pairs, 1)
        return Step(metrics, batch.tokens)

    def validate(self, run: Run) -> dict[str, float]:
        run.model.eval()
        loss, correct, count, size = 0.0, 0, 0, run.spec.batch_size
        with torch.no_grad(), run.place.compute():
            for i in range(0, len(run.valid), size):
                batch = pair_batch(run.valid[i : i + size], run.pad_id).to(run.place.device)
                scores = pair_scores(run.model, batch, self.beta)
                loss, correct = loss + float(scores.loss), correct + scores.correct
                count += scores.pairs
        run.model.train()
        whole = _pair_metrics("valid", PairScores(torch.tensor(loss), correct, 0.0, count))
        # Computed on the whole validation set, so the "full_" numbers are these same ones.
        return whole | {f"full_{k}": v for k, v in whole.items()}


def objective_for(spec: WorkerSpec) -> Objective:
    return Preference(spec.beta) if spec.method == "dpo" else Supervised()


# --- checkpoints -----------------------------------------------------------------------------


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(model, optimizer, progress: Progress, folder: Path) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    state = optimizer.state_dict()["state"]
    tensors = {f"{i}.{k}": v.contiguous() for i, s in state.items() for k, v in s.items()}
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(asdict(progress)))
    _publish(tmp, folder)


def load_checkpoint(model, optimizer, folder: Path) -> Progress:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = str(next(model.parameters()).device)
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors", device))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(folder / "optimizer.safetensors", device).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return Progress(**json.loads((folder / "state.json").read_text()))


# --- the run ---------------------------------------------------------------------------------


def train(
    spec: WorkerSpec, emit: Emit, pause_requested: Callable[[], bool] = lambda: False
) -> Finished:
    """The whole run; raises RunPaused when `pause_requested` turned true before its end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base_path)
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
    data = load_data(spec, tokenizer, spec.train_file, "training_file")
    rows, valid = data.rows, []
    if spec.valid_file:
        valid = load_data(spec, tokenizer, spec.valid_file, "validation_file").rows
    place = placement(spec.device)
    model = build_model(spec, place.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    progress = Progress()
    if spec.resume_dir:
        progress = load_checkpoint(model, optimizer, Path(spec.resume_dir))
    total = math.ceil(len(rows) / spec.batch_size) * spec.n_epochs
    run = Run(
        spec, model, optimizer, rows, valid, pad_id, total, emit, place, objective_for(spec),
        pause_requested,
    )  # fmt: skip
    emit(Started(total, len(rows), len(valid), data.truncated, progress.step, data.skipped,
                 str(place.device), place.precision))  # fmt: skip
    for epoch in range(progress.epoch, spec.n_epochs):
        progress = run_epoch(run, epoch, progress)
    adapter = Path(spec.out_dir) / "adapter"
    tmp = adapter.with_name("adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _publish(tmp, adapter)
    return Finished(progress.trained_tokens, str(adapter))


def run_epoch(run: Run, epoch: int, progress: Progress) -> Progress:
    """One pass over the shuffled data (the batches a pause left undone, when resumed from
    one), a metrics message per step, a checkpoint at the end."""
    spec, bs = run.spec, run.spec.batch_size
    order = epoch_order(len(run.rows), spec.seed, epoch)
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    step, tokens, data = progress.step, progress.trained_tokens, {}
    for j, indices in enumerate(batches):
        if j < progress.batches_done:
            continue
        if run.pause_requested():
            pause(run, Progress(epoch, step, tokens, j))
        lr = spec.learning_rate * (1 - step / run.total_steps)  # linear decay, from the step
        done = run.objective.step(run, [run.rows[i] for i in indices], lr)
        step, tokens = step + 1, tokens + done.tokens
        data = {"step": step, **done.scores, "total_steps": run.total_steps, "epoch": epoch + 1}
        if j == len(batches) - 1 and run.valid:
            data.update(run.objective.validate(run))
        run.emit(Metrics(step, data))
    progress = Progress(epoch + 1, step, tokens)
    folder = Path(spec.out_dir) / "checkpoints" / f"step-{step}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run.model, run.optimizer, progress, folder)
    run.emit(Checkpointed(step, epoch + 1, str(folder), data))
    return progress


def pause(run: Run, progress: Progress) -> None:
    """Save the run's state between two steps, say so, and end the run."""
    folder = Path(run.spec.out_dir) / PAUSE_DIR
    save_checkpoint(run.model, run.optimizer, progress, folder)
    run.emit(Paused(progress.step, str(folder)))
    raise RunPaused(progress.step)


def validation_scores(run: Run) -> dict[str, float]:
    scores = evaluate(run.model, run.valid, run.spec.batch_size, run.pad_id, run.place)
    # Computed on the whole validation set, so the "full_" numbers are these same ones.
    return {
        "valid_loss": scores.loss,
        "valid_mean_token_accuracy": scores.accuracy,
        "full_valid_loss": scores.loss,
        "full_valid_mean_token_accuracy": scores.accuracy,
    }
