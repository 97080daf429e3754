"""Make `genserve-starter-chat`, the LoRA adapter bundled beside `genserve-starter`.

    python scripts/make_starter_chat.py           # the exact run behind the shipped adapter
    python scripts/make_starter_chat.py --samples # the model card's sample outputs

Dogfooding: the adapter is made by genserve's own fine-tuning API, as a user would make one.
Steps: build a chat-format instruction set from the TRAINING split of the starter's corpus
(starter_data.py's selection; the starter's held-out files never enter it), start
`genserve serve --model genserve-starter`, upload the JSONL files to POST /v1/files, create a
job with POST /v1/fine_tuning/jobs, follow its events, then copy the job's adapter
(adapter_config.json + adapter_model.safetensors) to genserve/bundled/genserve-starter-chat/
with `"genserve_base": "genserve-starter"` added, which makes every server of the starter
serve it too. The job's numbers go to training_run.json beside it.

Two kinds of examples, from the functions, methods and classes that have a docstring:
  write:   user "Write a Python function `name(args)` that: <docstring's first paragraph>"
           -> assistant: the function's source (at most 40 lines, never cut);
  explain: user "What does `module.qualname` do?" -> assistant: that first paragraph.
An identical user message is kept once. Validation examples come from their own files (a fixed
hash of the path), so none of its functions is seen in training.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import starter_data as sd  # sits next to this script

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "genserve" / "bundled"
BASE = "genserve-starter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TERMINAL = ("succeeded", "failed", "cancelled")
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
SAMPLE_PROMPT = "Write a Python function `is_even(n)` that: Return True if n is even."


@dataclass(frozen=True, slots=True)
class ChatConfig:
    """Defaults are the shipped run: about 10 minutes of training on one CPU thread."""

    out_dir: str = "genserve/bundled/genserve-starter-chat"
    work_dir: str = "var/starter-chat"  # JSONL files and the server's data dir (wiped first)
    seed: int = 1234
    n_write: int = 1200
    n_explain: int = 300
    n_valid: int = 150
    valid_percent: int = 3  # of the training files, kept for validation
    max_lines: int = 40
    max_chars: int = 2000
    min_summary: int = 20
    max_summary: int = 300
    n_epochs: int = 2
    batch_size: int = 4
    learning_rate_multiplier: float = 10.0
    threads: int = 1  # beside other work, 1 thread trained faster here than 2

    def __post_init__(self) -> None:
        if min(self.n_write, self.n_explain, self.n_valid, self.n_epochs, self.threads) < 1:
            raise ValueError("counts, epochs and threads must be >= 1")
        if not 0 < self.valid_percent < 100:
            raise ValueError("valid_percent must be in (0, 100)")


@dataclass(frozen=True, slots=True)
class Example:
    kind: str  # "write" | "explain"
    source: str  # rel path of the corpus file
    user: str
    assistant: str

    def jsonl(self) -> str:
        messages = [
            {"role": "user", "content": self.user},
            {"role": "assistant", "content": self.assistant},
        ]
        return json.dumps({"messages": messages}, ensure_ascii=False)


# --- the instruction set ---------------------------------------------------------------------


def summary(node: ast.AST, cfg: ChatConfig) -> str | None:
    """The docstring's first paragraph on one line, or None when missing or out of bounds."""
    doc = ast.get_docstring(node)
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text if cfg.min_summary <= len(text) <= cfg.max_summary else None


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def definitions(tree: ast.Module) -> Iterator[tuple[str, ast.AST, str | None]]:
    """(qualified name, node, enclosing class) for top-level defs, classes and their methods."""
    for node in tree.body:
        if isinstance(node, FUNCS):
            yield node.name, node, None
        elif isinstance(node, ast.ClassDef):
            yield node.name, node, None
            for item in node.body:
                if isinstance(item, FUNCS):
                    yield f"{node.name}.{item.name}", item, node.name


def write_prompt(node: ast.FunctionDef, owner: str | None, text: str) -> str:
    signature = f"{node.name}({ast.unparse(node.args)})"
    if owner is None:
        return f"Write a Python function `{signature}` that: {text}"
    return f"Write the method `{signature}` of class `{owner}` that: {text}"


def file_examples(f: sd.SourceFile, cfg: ChatConfig) -> Iterator[Example]:
    try:
        tree = ast.parse(f.text)
    except SyntaxError:  # a few stdlib files target other grammars (lib2to3 fixtures)
        return
    lines, module = f.text.splitlines(), module_name(f.rel)
    for qualname, node, owner in definitions(tree):
        text = summary(node, cfg)
        if text is None:
            continue
        yield Example("explain", f.rel, f"What does `{module}.{qualname}` do?", text)
        if not isinstance(node, FUNCS) or node.end_lineno - node.lineno >= cfg.max_lines:
            continue
        code = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        code = textwrap.dedent(code.replace("\t", "    "))  # dedent needs one indent style
        if len(code) <= cfg.max_chars:
            yield Example("write", f.rel, write_prompt(node, owner, text), code)


def is_valid_file(rel: str, percent: int) -> bool:
    # A salted path hash, like the starter's held-out rule but independent of it.
    bucket = int(hashlib.sha1(f"starter-chat:{rel}".encode()).hexdigest()[:8], 16) % 100
    return bucket < percent


def example_pool(files: list[sd.SourceFile], cfg: ChatConfig) -> list[Example]:
    """Every candidate from the training split, in corpus order, first of each prompt kept."""
    seen: set[str] = set()
    pool = []
    for f in files:
        if f.heldout or f.rel == "pydoc_data/topics.py":
            continue
        for ex in file_examples(f, cfg):
            if ex.user not in seen:
                seen.add(ex.user)
                pool.append(ex)
    return pool


def draw(pool: list[Example], kind: str, k: int, rng: random.Random) -> list[Example]:
    chosen = [ex for ex in pool if ex.kind == kind]
    return rng.sample(chosen, min(k, len(chosen)))


def split(pool: list[Example], cfg: ChatConfig) -> tuple[list[Example], list[Example]]:
    """Seeded draws: write and explain examples for training, a mixed validation set."""
    rng = random.Random(cfg.seed)
    valid_pool = [ex for ex in pool if is_valid_file(ex.source, cfg.valid_percent)]
    train_pool = [ex for ex in pool if not is_valid_file(ex.source, cfg.valid_percent)]
    train = draw(train_pool, "write", cfg.n_write, rng)
    train += draw(train_pool, "explain", cfg.n_explain, rng)
    rng.shuffle(train)
    share = round(cfg.n_valid * cfg.n_write / (cfg.n_write + cfg.n_explain))
    valid = draw(valid_pool, "write", share, rng)
    valid += draw(valid_pool, "explain", cfg.n_valid - share, rng)
    return train, valid


def checked_corpus() -> list[sd.SourceFile]:
    """The starter's corpus, re-selected and compared file by file with its manifest."""
    shipped = json.loads((BUNDLED / BASE / "training_corpus.json").read_text())
    files = sd.load_corpus(shipped["val_percent"])
    ours = {(f.rel, f.sha256, f.heldout) for f in files}
    theirs = {(f["path"], f["sha256"], f["heldout"]) for f in shipped["files"]}
    if ours != theirs:
        sys.exit(
            f"this stdlib ({sd.python_version()}) differs from the starter's corpus "
            f"({shipped['python']}) in {len(ours ^ theirs)} entries; run with that Python"
        )
    return files


def write_jsonl(examples: list[Example], path: Path) -> dict[str, Any]:
    path.write_text("".join(ex.jsonl() + "\n" for ex in examples), encoding="utf-8")
    kinds = {k: sum(ex.kind == k for ex in examples) for k in ("write", "explain")}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "examples": len(examples),
        **kinds,
        "files": len({ex.source for ex in examples}),
        "bytes": path.stat().st_size,
        "sha256": digest,
    }


# --- the server and the job ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, threads: int, log_path: Path, model: str | None) -> tuple:
    """`genserve serve` in a subprocess; (process, base URL) once /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "genserve.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--data-dir", str(data_dir), "--embedding-model", "none"]
    cmd += ["--training-threads", str(threads)] + (["--model", model] if model else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not become healthy; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> dict:
    r = http.request(method, path, **kwargs)
    if not r.is_success:
        sys.exit(f"{method} {path}: {r.status_code} {r.text[:500]}")
    return r.json()


def upload(http: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        files = {"file": (path.name, f, "application/jsonl")}
        return call(http, "POST", "/v1/files", data={"purpose": "fine-tune"}, files=files)["id"]


def create_job(http: httpx.Client, train: Path, valid: Path, cfg: ChatConfig) -> dict:
    hyper = {
        "n_epochs": cfg.n_epochs,
        "batch_size": cfg.batch_size,
        "learning_rate_multiplier": cfg.learning_rate_multiplier,
    }
    body = {
        "model": BASE,
        "training_file": upload(http, train),
        "validation_file": upload(http, valid),
        "suffix": "chat",
        "seed": cfg.seed,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }
    return call(http, "POST", "/v1/fine_tuning/jobs", json=body)


def all_events(http: httpx.Client, job_id: str) -> list[dict]:
    """Every event of the job, oldest first (the route pages newest first)."""
    events: list[dict] = []
    params: dict[str, Any] = {"limit": 1000}
    while True:
        page = call(http, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        events += page["data"]
        if not page.get("has_more") or not page["data"]:
            return events[::-1]
        params["after"] = page["data"][-1]["id"]


def follow(http: httpx.Client, job_id: str) -> dict:
    """Print the job's messages (one metrics line in 25) until it ends; the final job."""
    seen: set[str] = set()
    while True:
        page = call(http, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        for event in reversed(page["data"]):
            if event["id"] in seen:
                continue
            seen.add(event["id"])
            step = (event.get("data") or {}).get("step", 0)
            if event.get("type") != "metrics" or step % 25 == 0 or "valid_loss" in event["data"]:
                print(time.strftime("%H:%M:%S"), event["message"], flush=True)
        job = call(http, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        if job["status"] in TERMINAL:
            return job
        time.sleep(2)


# --- the shipped folder ----------------------------------------------------------------------


def export_adapter(adapter: Path, out: Path) -> None:
    """The adapter's two files only, tagged with its base so that the starter serves it."""
    shutil.rmtree(out / "adapter.tmp", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE  # not the absolute path of this checkout
    config["genserve_base"] = BASE
    config["target_modules"] = sorted(config["target_modules"])  # peft writes a set's order
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")


def epoch_table(events: list[dict]) -> list[dict]:
    """Per epoch: mean training loss over its steps, and the validation scores at its end."""
    rows: dict[int, dict] = {}
    for e in events:
        data = e.get("data") or {}
        if e.get("type") != "metrics" or "step" not in data:
            continue
        row = rows.setdefault(data["epoch"], {"epoch": data["epoch"], "losses": []})
        row["losses"].append(data["train_loss"])
        row["last_step"] = data["step"]
        if "valid_loss" in data:
            row["valid_loss"] = data["valid_loss"]
            row["valid_mean_token_accuracy"] = data["valid_mean_token_accuracy"]
    for row in rows.values():
        losses = row.pop("losses")
        row["mean_train_loss"] = sum(losses) / len(losses)
    return [rows[k] for k in sorted(rows)]


def loss_curve(events: list[dict], every: int = 50) -> list[dict]:
    """Mean training loss over each `every` steps (one step's loss is one small batch's)."""
    metrics = [e["data"] for e in events if e.get("type") == "metrics" and "step" in e["data"]]
    curve = []
    for i in range(0, len(metrics), every):
        window = metrics[i : i + every]
        loss = sum(m["train_loss"] for m in window) / len(window)
        curve.append({"steps": f"{window[0]['step']}-{window[-1]['step']}", "train_loss": loss})
    return curve


def base_valid_scores(spec_path: Path) -> dict[str, float]:
    """The base model's validation scores before training, by the trainer's own code on the
    job's own spec: the metric the job reports at the end of each epoch, so they compare."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genserve.training import trainer
    from genserve.training.worker import WorkerSpec

    spec = WorkerSpec.model_validate_json(spec_path.read_text())
    torch.set_num_threads(spec.threads)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_path)
    rows = trainer.load_data(spec, tokenizer, spec.valid_file, "validation_file").rows
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_path, dtype=torch.float32, use_safetensors=True
    )
    scores = trainer.evaluate(model, rows, spec.batch_size, tokenizer.pad_token_id)
    return {"valid_loss": scores.loss, "valid_mean_token_accuracy": scores.accuracy}


def training_seconds(events: list[dict]) -> int:
    """From the worker's start to its last step (the job's wall time also counts checks)."""
    started = [e["created_at"] for e in events if e["message"].startswith("Fine-tuning job st")]
    steps = [e["created_at"] for e in events if e.get("type") == "metrics"]
    return steps[-1] - started[0] if started and steps else 0


def run_record(
    cfg: ChatConfig, data: dict, job: dict, events: list[dict], before: dict[str, float]
) -> dict:
    import torch

    return {
        "config": dataclasses.asdict(cfg),
        "command": "python scripts/make_starter_chat.py",
        "data": data,
        "job": {
            k: job.get(k)
            for k in (
                "id",
                "model",
                "fine_tuned_model",
                "seed",
                "hyperparameters",
                "trained_tokens",
                "created_at",
                "finished_at",
                "status",
            )
        },
        "job_wall_s": (job["finished_at"] or 0) - job["created_at"],
        "train_wall_s": training_seconds(events),
        "base_before_training": before,
        "epochs": epoch_table(events),
        "loss_curve": loss_curve(events),
        "python": sd.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "training_threads": cfg.threads,
    }


def make(cfg: ChatConfig) -> None:
    work, out = REPO / cfg.work_dir, REPO / cfg.out_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, valid = split(example_pool(checked_corpus(), cfg), cfg)
    data = {
        "train": write_jsonl(train, work / "train.jsonl"),
        "valid": write_jsonl(valid, work / "valid.jsonl"),
    }
    print(json.dumps(data, indent=2), flush=True)
    proc, url = start_server(work / "data", cfg.threads, work / "server.log", BASE)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            job = create_job(http, work / "train.jsonl", work / "valid.jsonl", cfg)
            job = follow(http, job["id"])
            events = all_events(http, job["id"])
    finally:
        stop_server(proc)
    if job["status"] != "succeeded":
        sys.exit(f"the job {job['status']}: {job.get('error')}")
    job_dir = work / "data" / "jobs" / job["id"]
    export_adapter(job_dir / "adapter", out)
    record = run_record(cfg, data, job, events, base_valid_scores(job_dir / "spec.json"))
    (out / "training_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        json.dumps(
            {k: record[k] for k in ("job", "train_wall_s", "base_before_training", "epochs")},
            indent=2,
        )
    )


# --- the model card's samples ----------------------------------------------------------------


def samples(cfg: ChatConfig, prompt: str, seeds: list[int]) -> None:
    """The card's requests: the default server (the starter and this adapter), each seed."""
    work = REPO / cfg.work_dir / "samples"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc, url = start_server(work / "data", 1, work / "server.log", None)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            for model in ("genserve-starter-chat", BASE):
                for seed in seeds:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": prompt}],
                        "temperature": 0.7,
                        "seed": seed,
                        "max_tokens": 200,
                    }
                    choice = call(http, "POST", "/v1/chat/completions", json=body)["choices"][0]
                    print(f"### {model}, seed {seed} (finish_reason: {choice['finish_reason']})")
                    print(choice["message"]["content"] + "\n", flush=True)
    finally:
        stop_server(proc)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", action="store_true", help="print the card's samples")
    parser.add_argument("--prompt", default=SAMPLE_PROMPT, help="with --samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --samples")
    for f in dataclasses.fields(ChatConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(ChatConfig)}
    cfg = ChatConfig(**{k: v for k, v in chosen.items() if v is not None})
    if args.samples:
        samples(cfg, args.prompt, args.seeds)
    else:
        make(cfg)


if __name__ == "__main__":
    main()
