"""Train `genserve-starter`, the small model bundled with genserve, from scratch on CPU.

    python scripts/pretrain_starter.py            # the exact run behind the shipped model

Steps: select the corpus (the running Python's standard library, see starter_data.py),
train a byte-level BPE tokenizer on the training split, pack the token streams, pre-train a
Llama-architecture causal LM, then export a Hugging Face folder to
genserve/bundled/genserve-starter/. Progress and optimizer state are checkpointed to
var/starter-ckpt/; rerunning the same command resumes from the last checkpoint.
Then measure it with `python scripts/eval_starter.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

# The BPE trainer would otherwise take every core; this must precede importing tokenizers.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import starter_data as sd  # noqa: E402  (sits next to this script)
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLAG_TYPES = {"int": int, "float": float, "str": str}
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True, slots=True)
class StarterConfig:
    """Defaults are the shipped run. Sized for about an hour on one CPU core: a wide, shallow
    model (~10M parameters, a third of them the tied embedding) seeing ~8M tokens."""

    out_dir: str = "genserve/bundled/genserve-starter"
    ckpt_dir: str = "var/starter-ckpt"
    seed: int = 1234
    val_percent: int = 2
    chat_max_chars: int = 400
    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1024
    max_positions: int = 1024
    seq_len: int = 512
    batch_size: int = 8
    total_steps: int = 2000
    warmup_steps: int = 100
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    ckpt_every: int = 25
    log_every: int = 10
    threads: int = 1
    # bf16 autocast: 2-3x faster than fp32 on CPUs with AVX512-BF16; master weights stay fp32.
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.seq_len > self.max_positions:
            raise ValueError("seq_len must not exceed max_positions")
        if not 0 < self.val_percent < 100:
            raise ValueError("val_percent must be in (0, 100)")


@dataclass(slots=True)
class Data:
    """Token streams plus the tokenizer that made them."""

    tokenizer: Tokenizer
    train: torch.Tensor
    val: torch.Tensor
    manifest: dict


def parse_args() -> StarterConfig:
    """Every config field is a flag (--total-steps 50 ...), defaults from the dataclass."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(StarterConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=FLAG_TYPES[field.type], default=field.default)
    return StarterConfig(**vars(parser.parse_args()))


def train_tokenizer(cfg: StarterConfig, files: list[sd.SourceFile]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any text round-trips, no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=sd.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in files if not f.heldout), trainer=trainer)
    return tok


def prepare_data(cfg: StarterConfig, ckpt: Path, console: Console) -> Data:
    """Tokenizer and streams, cached in the checkpoint folder so a resume skips this."""
    files = sd.load_corpus(cfg.val_percent)
    manifest = sd.manifest(files, cfg.val_percent)
    key = json.dumps([manifest, cfg.vocab_size, cfg.chat_max_chars])
    cache = ckpt / "data.pt"
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
        if cached["key"] != key:
            raise SystemExit(f"{cache} was built from other data settings; delete {ckpt}")
        tok = Tokenizer.from_str(cached["tokenizer"])
        return Data(tok, cached["train"], cached["val"], manifest)
    console.log(f"corpus: {manifest['n_files']} files, {manifest['n_heldout']} held out")
    tok = train_tokenizer(cfg, files)
    eot = tok.token_to_id(sd.EOT)
    chats = sd.chat_documents(files, cfg.chat_max_chars)
    train_docs = [f.text for f in files if not f.heldout] + chats

    def encode(docs: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(docs)]

    train = sd.token_stream(encode, train_docs, eot)
    val = sd.token_stream(encode, [f.text for f in files if f.heldout], eot)
    blob = {"tokenizer": tok.to_str(), "train": train, "val": val, "key": key}
    torch.save(blob, cache)
    console.log(f"tokens: train {len(train):,} (incl. {len(chats)} chat docs), val {len(val):,}")
    return Data(tok, train, val, manifest)


def build_model(cfg: StarterConfig, tok: Tokenizer) -> LlamaForCausalLM:
    eot = tok.token_to_id(sd.EOT)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,  # a third of the parameters otherwise, for little gain
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, cfg: StarterConfig) -> torch.optim.AdamW:
    # No weight decay on norms (1-D) – decaying a gain towards zero only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, cfg: StarterConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * peak."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.peak_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class Batches:
    """Batch for step s is a pure function of (seed, s): resuming needs only the step.

    Each epoch shuffles fixed-length windows of the packed stream, shifting the window grid
    by an epoch-specific offset so repeated epochs do not see identical boundaries."""

    def __init__(self, stream: torch.Tensor, cfg: StarterConfig) -> None:
        self.stream, self.cfg = stream, cfg
        self.n_windows = (len(stream) - 1 - cfg.seq_len) // cfg.seq_len
        self._epoch, self._perm, self._offset = -1, torch.empty(0), 0

    def _plan(self, epoch: int) -> None:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=gen)
            self._offset = int(torch.randint(0, self.cfg.seq_len, (1,), generator=gen))
            self._epoch = epoch

    def get(self, step: int) -> torch.Tensor:
        rows = []
        for i in range(step * self.cfg.batch_size, (step + 1) * self.cfg.batch_size):
            self._plan(i // self.n_windows)
            start = self._offset + int(self._perm[i % self.n_windows]) * self.cfg.seq_len
            rows.append(self.stream[start : start + self.cfg.seq_len + 1])
        return torch.stack(rows).long()


def train_step(model, opt, batch: torch.Tensor, lr: float, cfg: StarterConfig) -> float:
    model.train()
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        logits = model(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    # Write then rename: an interruption mid-save never corrupts the last good checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), **state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt, cfg: StarterConfig) -> dict:
    fresh = {"step": 0, "elapsed_s": 0.0, "history": "[]", "config": json.dumps(asdict(cfg))}
    if not path.exists():
        return fresh
    ckpt = torch.load(path, weights_only=True)
    if json.loads(ckpt["config"]) != asdict(cfg):
        raise SystemExit(f"{path} was made with another config; delete it or match the flags")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return {k: ckpt[k] for k in fresh}


def asdict(cfg: StarterConfig) -> dict:
    # Paths and the periodic settings do not change the result, so a resume may alter them.
    skip = {"out_dir", "ckpt_dir", "eval_every", "ckpt_every", "log_every", "threads"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:>6.0f} tok/s  loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def train(cfg: StarterConfig, data: Data, ckpt: Path, console: Console) -> tuple:
    model = build_model(cfg, data.tokenizer)
    opt = make_optimizer(model, cfg)
    state = load_checkpoint(ckpt / "state.pt", model, opt, cfg)
    history: list[dict] = json.loads(state["history"])
    n_params = sum(p.numel() for p in model.parameters())
    console.log(f"model: {n_params:,} parameters; resuming at step {state['step']}")
    batches = Batches(data.train, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    with progress_bar(console) as bar:
        task = bar.add_task("", total=cfg.total_steps, completed=state["step"], tps=0, loss=0)
        while state["step"] < cfg.total_steps:
            step, t0 = state["step"], time.perf_counter()
            loss = train_step(model, opt, batches.get(step), lr_at(step, cfg), cfg)
            step_s = time.perf_counter() - t0
            state["step"], state["elapsed_s"] = step + 1, state["elapsed_s"] + step_s
            tps = tokens_per_step / step_s
            bar.update(task, advance=1, tps=tps, loss=loss)
            record = periodic(cfg, model, data, state, loss, tps, console)
            if record:
                history.append(record)
            if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.total_steps:
                state["history"] = json.dumps(history)
                save_checkpoint(ckpt / "state.pt", model, opt, state)
    return model, state, history, n_params


def periodic(cfg, model, data: Data, state: dict, loss: float, tps: float, console) -> dict:
    """A plain log line (readable under nohup, where the bar cannot redraw) and the
    periodic held-out loss. Returns a history record when one is due."""
    step = state["step"]
    tokens = step * cfg.batch_size * cfg.seq_len
    if step % cfg.log_every == 0:
        console.log(f"step {step} tokens {tokens:,} loss {loss:.4f} {tps:.0f} tok/s")
    if step % cfg.eval_every and step != cfg.total_steps:
        return {}
    val = sd.mean_nll(model, data.val, cfg.seq_len, cfg.bf16_autocast)
    console.log(f"step {step} val loss {val:.4f} ppl {math.exp(val):.2f}")
    return {
        "step": step,
        "tokens": tokens,
        "train_loss": loss,
        "val_loss": val,
        "elapsed_s": round(state["elapsed_s"], 1),
    }


def export(cfg: StarterConfig, model, data: Data, state: dict, history, n_params: int) -> None:
    """The shipped folder: standard HF files, weights as bf16 safetensors to fit 30 MB."""
    out = REPO / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tok = data.tokenizer
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # written owner-only; a package must be readable
    eos = [tok.token_to_id(sd.EOT), tok.token_to_id(sd.IM_END)]
    GenerationConfig(bos_token_id=eos[0], eos_token_id=eos, pad_token_id=eos[0]).save_pretrained(
        out
    )
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(cfg))
    training = {
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "tokens_seen": state["step"] * cfg.batch_size * cfg.seq_len,
        "train_stream_tokens": len(data.train),
        "heldout_stream_tokens": len(data.val),
        "train_wall_s": round(state["elapsed_s"], 1),
        "torch": torch.__version__,
        "torch_threads": cfg.threads,
        "cpu": cpu_name(),
        "history": history,
    }
    write_json(out / "training_run.json", training)
    write_json(out / "training_corpus.json", data.manifest)


def tokenizer_config(cfg: StarterConfig) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": sd.EOT,
        "eos_token": sd.EOT,
        "pad_token": sd.EOT,
        "unk_token": None,
        "additional_special_tokens": [sd.IM_START, sd.IM_END],
        "model_max_length": cfg.max_positions,
        "clean_up_tokenization_spaces": False,  # else decode(encode(x)) != x for code
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    console = Console()
    ckpt = REPO / cfg.ckpt_dir
    ckpt.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, ckpt, console)
    try:
        model, state, history, n_params = train(cfg, data, ckpt, console)
    except KeyboardInterrupt:
        # Not saved here: the step in flight may be half applied. The periodic checkpoint
        # is consistent, and the batch order depends only on the step, so resuming from it
        # replays exactly what the uninterrupted run would have done.
        raise SystemExit(f"interrupted; rerun the same command to resume from {ckpt}") from None
    export(cfg, model, data, state, history, n_params)
    console.log(f"exported to {REPO / cfg.out_dir}; next: python scripts/eval_starter.py")


if __name__ == "__main__":
    main()
