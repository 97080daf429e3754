"""Held-out perplexity of `genserve-starter` next to a unigram baseline, plus samples.

    python scripts/eval_starter.py                 # numbers in the model card
    python scripts/eval_starter.py --samples       # and the card's sample outputs
    python scripts/eval_starter.py --dtype bfloat16                 # through the server
    python scripts/eval_starter.py --dtype auto --quantization int8

With --dtype or --quantization the same held-out windows go through a genserve server started
with those flags (completions with echo and logprobs: every prompt token's log-probability as
the serving path computes it, kernels and weight format included), and through a second one
started with --dtype float32 in the same run; both perplexities and their ratio are printed
(issue 14's goal: int8 within 1% of fp32, bf16 within 0.5%).

The held-out files are re-selected from the running Python's standard library with the rule
in starter_data.py and checked against the manifest shipped with the model
(training_corpus.json), so the numbers are only reported for the exact same text. Both
perplexities are per token of the model's own tokenizer, over the same predicted tokens:
the held-out files packed as in training (each followed by <|endoftext|>), cut into windows
of seq_len + 1 tokens that overlap by one, so each token after the first is predicted once.
The unigram baseline uses add-one smoothed token frequencies of the training split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import starter_data as sd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from common import ServerProcess, free_port  # noqa: E402 - bench/ is not a package

DEFAULT_MODEL = REPO / "genserve" / "bundled" / "genserve-starter"
# Prompts end mid-line: the byte-level BPE merges a newline with the indentation after it,
# so a prompt ending in a bare "\n" asks for a token split the model rarely saw.
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(root):",
    "class Stack:",
]
# A chat prompt in the form of the chat documents the model was trained on.
SAMPLE_CHAT = "Write a Python function `fibonacci`: Return the n-th Fibonacci number."


@dataclass(frozen=True, slots=True)
class EvalResult:
    python: str
    heldout_files: int
    heldout_bytes: int
    predicted_tokens: int
    seq_len: int
    model_nll: float
    model_ppl: float
    model_bits_per_byte: float
    unigram_ppl: float
    unigram_bits_per_byte: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seq-len", type=int, default=512, help="the training context")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", action="store_true", help="also print sample outputs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    parser.add_argument("--json-out", type=Path, help="write the numbers here as JSON")
    parser.add_argument("--dtype", help="evaluate through a server with this --dtype")
    parser.add_argument("--quantization", help="evaluate through a server with this option")
    parser.add_argument(
        "--allow-corpus-mismatch",
        action="store_true",
        help="report even if this Python's stdlib differs from the training manifest",
    )
    return parser.parse_args()


def checked_corpus(model_dir: Path, allow_mismatch: bool) -> list[sd.SourceFile]:
    """Re-select the corpus and compare it file by file with the shipped manifest."""
    shipped = json.loads((model_dir / "training_corpus.json").read_text())
    files = sd.load_corpus(shipped["val_percent"])
    ours = {(f.rel, f.sha256, f.heldout) for f in files}
    theirs = {(f["path"], f["sha256"], f["heldout"]) for f in shipped["files"]}
    if ours != theirs:
        msg = (
            f"this stdlib ({sd.python_version()}) differs from the training corpus "
            f"({shipped['python']}): {len(ours ^ theirs)} file entries differ"
        )
        if not allow_mismatch:
            sys.exit(msg + "; rerun with that Python or pass --allow-corpus-mismatch")
        print("warning: " + msg, file=sys.stderr)
    return files


def unigram_nll(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL of targets under add-one smoothed unigram frequencies of train."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[targets.long()].mean().item()


def evaluate(model_dir: Path, files: list[sd.SourceFile], seq_len: int) -> EvalResult:
    tok = AutoTokenizer.from_pretrained(model_dir)
    # Shipped weights are bf16; compute in fp32 so the number does not depend on the CPU.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eot = tok.convert_tokens_to_ids(sd.EOT)

    def encode(docs: list[str]) -> list[list[int]]:
        return tok(docs, add_special_tokens=False, verbose=False)["input_ids"]

    heldout = [f.text for f in files if f.heldout]
    val = sd.token_stream(encode, heldout, eot)
    train = sd.token_stream(encode, [f.text for f in files if not f.heldout], eot)
    nll = sd.mean_nll(model, val, seq_len, bf16=False)
    uni = unigram_nll(train, val[1:], len(tok))
    n_bytes = sum(len(t.encode("utf-8")) for t in heldout)
    n_pred = len(val) - 1
    return EvalResult(
        python=sd.python_version(),
        heldout_files=len(heldout),
        heldout_bytes=n_bytes,
        predicted_tokens=n_pred,
        seq_len=seq_len,
        model_nll=round(nll, 4),
        model_ppl=round(math.exp(nll), 2),
        model_bits_per_byte=round(nll * n_pred / math.log(2) / n_bytes, 4),
        unigram_ppl=round(math.exp(uni), 2),
        unigram_bits_per_byte=round(uni * n_pred / math.log(2) / n_bytes, 4),
    )


@dataclass(frozen=True, slots=True)
class ServedNll:
    flags: tuple[str, ...]
    nll: float
    ppl: float


def served_nll(model_dir: Path, val: torch.Tensor, seq_len: int, flags: list[str]) -> ServedNll:
    """Mean NLL of the held-out windows as a server started with `flags` scores them."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "genserve.cli", "serve", "--model", str(model_dir),
                "--port", str(port), "--data-dir", tmp, "--embedding-model", "none",
                *flags]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
        server = ServerProcess(args, Path(tmp) / "server.log", env)
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            server.wait_healthy(url, 300)
            with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
                name = http.get("/v1/models").json()["data"][0]["id"]
                total, count = 0.0, 0
                for window in sd.windows(val, seq_len):
                    total += -sum(prompt_logprobs(http, name, window.tolist()))
                    count += len(window) - 1
        finally:
            server.stop()
    nll = total / count
    return ServedNll(tuple(flags), round(nll, 6), round(math.exp(nll), 4))


def prompt_logprobs(http: httpx.Client, model: str, ids: list[int]) -> list[float]:
    """log p of every prompt token after the first (echo + logprobs, max_tokens 1)."""
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 1,
            "temperature": 0}  # fmt: skip
    r = http.post("/v1/completions", json=body)
    r.raise_for_status()
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    return lps[1 : len(ids)]  # [0] has no context; after the prompt comes the sampled token


def compare_served(model_dir: Path, files: list[sd.SourceFile], seq_len: int, flags: list[str]):
    tok = AutoTokenizer.from_pretrained(model_dir)
    eot = tok.convert_tokens_to_ids(sd.EOT)

    def encode(docs: list[str]) -> list[list[int]]:
        return tok(docs, add_special_tokens=False, verbose=False)["input_ids"]

    val = sd.token_stream(encode, [f.text for f in files if f.heldout], eot)
    reference = served_nll(model_dir, val, seq_len, ["--dtype", "float32"])
    tried = served_nll(model_dir, val, seq_len, flags)
    return {
        "predicted_tokens": len(val) - 1,
        "reference": asdict(reference),
        "tried": asdict(tried),
        "ppl_ratio": round(tried.ppl / reference.ppl, 5),
    }


def print_samples(model_dir: Path, seeds: list[int]) -> None:
    """The card's samples: model.generate, temperature 0.7, top_p 1.0, top_k off, seed set
    with torch.manual_seed right before each call."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": SAMPLE_CHAT}]
    chat_prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for prompt in [*SAMPLE_PROMPTS, chat_prompt]:
        for seed in seeds:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            torch.manual_seed(seed)
            out = model.generate(
                ids, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=80
            )
            print(f"--- prompt {prompt!r}, seed {seed}")
            print(prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    files = checked_corpus(args.model, args.allow_corpus_mismatch)
    flags = [f"--{k}={v}" for k, v in (("dtype", args.dtype), ("quantization", args.quantization))
             if v is not None]  # fmt: skip
    if flags:
        result = compare_served(args.model, files, args.seq_len, flags)
    else:
        result = asdict(evaluate(args.model, files, args.seq_len))
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.samples:
        print_samples(args.model, args.seeds)


if __name__ == "__main__":
    main()
