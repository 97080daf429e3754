"""Shared helpers for the benchmarks: the benchmark model folder, prompts, the server process.

Nothing here is imported by genserve; the benchmarks drive the server only over HTTP, the way
a caller would, so what they measure includes the API edge and the SSE stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
# var/ is gitignored: a built model folder (~540 MB of fp32 weights) is reused between runs.
DEFAULT_MODEL_DIR = REPO_ROOT / "var" / "bench-models" / "smollm2-135m-random"
SPEC_FILE = "bench-spec.json"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of SmolLM2-135M; random weights are enough because we time compute, not quality."""

    hidden_size: int = 576
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    intermediate_size: int = 1536
    vocab_size: int = 49152
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class PromptSet:
    """Prompts of exactly `tokens` tokens each, as text and as the ids the server will see."""

    tokens: int
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)


def ensure_model_dir(model_dir: Path, spec: ModelSpec) -> Path:
    """Build the random model folder unless one built from the same spec is already there."""
    marker = model_dir / SPEC_FILE
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    _save_model(model_dir, spec)
    _build_tokenizer(spec.vocab_size).save_pretrained(str(model_dir))
    # The marker goes last, so an interrupted build is rebuilt rather than half reused.
    marker.write_text(json.dumps(asdict(spec), indent=2))
    return model_dir


def _save_model(model_dir: Path, spec: ModelSpec) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in asdict(spec).items() if k != "seed"}
    config = LlamaConfig(
        **fields, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(str(model_dir), safe_serialization=True)


def _build_tokenizer(vocab_size: int):
    """A byte-level BPE that covers every id, built from synthetic merges in well under a second.

    Training a BPE on real text up to 49152 entries costs tens of seconds and may fall short of
    the size; synthetic merges give the exact size. Every id past the 256 bytes is printable
    ASCII, so a random model's output decodes to text almost always (a lone byte token is rare).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    ascii_chars = [_byte_char(b) for b in range(32, 127)]
    vocab = {EOS_TOKEN: 0}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    merges = _synthetic_merges(ascii_chars, vocab_size - len(vocab))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def _byte_char(byte: int) -> str:
    # ByteLevel shows printable ASCII as itself and the space as "Ġ" (U+0120).
    return "\u0120" if byte == 32 else chr(byte)


def _synthetic_merges(chars: list[str], count: int) -> list[tuple[str, str]]:
    """All ASCII pairs first (so any ASCII text merges), then pair+char triples up to `count`."""
    pairs = [(a, b) for a in chars for b in chars]
    merges = pairs[:count]
    for left, right in pairs:
        for ch in chars:
            if len(merges) >= count:
                return merges
            merges.append((left + right, ch))
    return merges


def build_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> PromptSet:
    """`count` different prompts of exactly `tokens` tokens each.

    Different prompts keep a prefix cache from turning the benchmark into a cache benchmark.
    Every word is " " + letters, which the ByteLevel pre-tokenizer keeps as one piece, so the
    prompt's length is the sum of its words' lengths and can be filled exactly.
    """
    rng = random.Random(seed)
    texts: list[str] = []
    ids: list[list[int]] = []
    for _ in range(count):
        text = _prompt_text(tokenizer, rng, tokens)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != tokens:
            raise RuntimeError(f"prompt has {len(encoded)} tokens, wanted {tokens}")
        texts.append(text)
        ids.append(encoded)
    return PromptSet(tokens=tokens, texts=texts, ids=ids)


def _prompt_text(tokenizer, rng: random.Random, tokens: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: list[str] = []
    total = 0
    while total < tokens:
        word = " " + "".join(rng.choices(letters, k=rng.randint(1, 7)))
        size = len(tokenizer.encode(word, add_special_tokens=False))
        if total + size > tokens:
            # " x" is a single token (every space+ASCII pair is a merge), so this always fits.
            word, size = " " + rng.choice(letters), 1
        words.append(word)
        total += size
    return "".join(words)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def started_fully(health: dict) -> bool:
    """Every model's grammar helper has loaded, its --compile-decode graph has compiled, and
    no other model is still loading: all of them run in the background once the model serves,
    and take cores from the first requests measured (the helper, a process importing torch:
    one stream at 24 tok/s in the first round, 35 in the second, on 2 cores; the embeddings
    model's load: a first request's first 32 tokens at 15-26 ms each against 7 after)."""
    models = health.get("models", {}).values()
    return not health.get("loading") and all(
        m.get("grammar", "ready") != "starting" and m.get("compiled_decode") != "compiling"
        for m in models
    )


@dataclass(slots=True)
class ServerProcess:
    """`genserve serve` as a child process; its output goes to a log file, shown on failure."""

    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        # A new session, so stopping the server also reaches any workers it spawns.
        self.proc = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=self.env,
            start_new_session=True,
        )
        log.close()

    def wait_healthy(self, base_url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{base_url}/health", timeout=2.0)
                if r.status_code == 200 and started_fully(r.json()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM for a graceful shutdown, SIGKILL if it does not come."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def thread_env(threads: int | None) -> dict[str, str] | None:
    """Environment that pins the server's intra-op threads to what the baselines used."""
    if threads is None:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def busy_warning() -> str | None:
    """A note when other work already loads the CPU: both sides of a ratio then run slower,
    and not by the same factor (a busy core stalls every synchronising thread of a small op).
    """
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load < 0.5:
        return None
    return f"warning: load average {load:.1f} on {cpus} CPUs before the run; numbers are noisy"


def serve_command(model_dir: Path, port: int, max_batch: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "genserve.cli", "serve",
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(max_batch), "--dtype", "float32", *extra,
    ]  # fmt: skip


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a server and its children: the engine runs in a process of its own."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


async def streamed_decode_rate(http: httpx.AsyncClient, body: dict) -> float:
    """One streamed completion's tokens after its first, per second of the time they took
    (the prefill the request paid or saved left out). `body` asks for a stream."""
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = time.perf_counter()
                first = first or last
                tokens += 1
    assert first is not None and last is not None and tokens > 1, "no tokens streamed"
    return (tokens - 1) / (last - first)
