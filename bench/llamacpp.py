"""llama.cpp's `llama-server` as a peer in bench/throughput.py, on the same weights and load.

    python bench/throughput.py --llama-cpp DIR --precisions fp32,int8,llama.cpp-f32,llama.cpp-q8_0

DIR is a llama.cpp source tree (the one vendored in the llama-cpp-python sdist will do) with
`llama-server` built under DIR/build/bin; README "Measured against llama.cpp" has the commands.
The benchmark's model folder is converted by llama.cpp's own convert_hf_to_gguf.py (through
bench/gguf_convert.py) once per format and kept next to the folder. The server gets a slot per
concurrent client and context for the longest request each slot will hold; everything else is
llama-server's default, which is what its users get (its default sampler chain, for example,
also applies top_k 40 and min_p 0.05 to a request that names only temperature and top_p).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import ServerProcess

# precision name in bench/throughput.py -> GGUF --outtype
FORMATS = {"llama.cpp-f32": "f32", "llama.cpp-bf16": "bf16", "llama.cpp-q8_0": "q8_0"}
# what each genserve precision is compared with, when both ran
PEERS = {"fp32": "llama.cpp-f32", "bf16": "llama.cpp-bf16", "auto": "llama.cpp-bf16",
         "int8": "llama.cpp-q8_0"}  # fmt: skip
BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class LlamaCpp:
    root: Path  # a llama.cpp source tree with build/bin/llama-server

    @property
    def server(self) -> Path:
        return self.root / "build" / "bin" / "llama-server"

    def check(self) -> str | None:
        """Why this tree cannot be used, or None."""
        if not (self.root / "convert_hf_to_gguf.py").is_file():
            return f"{self.root} has no convert_hf_to_gguf.py"
        if not self.server.is_file():
            return f"{self.server} is not built"
        return None


def gguf_file(model_dir: Path, precision: str) -> Path:
    return model_dir.parent / f"{model_dir.name}-gguf" / f"{FORMATS[precision]}.gguf"


def convert(llama: LlamaCpp, model_dir: Path, precision: str) -> Path:
    """The model in this GGUF format, converted on first use."""
    out = gguf_file(model_dir, precision)
    if out.is_file() and out.stat().st_mtime >= (model_dir / "config.json").stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    args = [sys.executable, str(BENCH_DIR / "gguf_convert.py"), str(llama.root), str(model_dir),
            "--outtype", FORMATS[precision], "--outfile", str(partial)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed:\n{done.stderr[-3000:]}")
    partial.replace(out)
    return out


def server_command(
    llama: LlamaCpp, gguf: Path, port: int, slots: int, slot_tokens: int, threads: int | None
) -> list[str]:
    """One slot per concurrent client, each with room for the longest request it will hold."""
    args = [
        str(llama.server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(slots), "--ctx-size", str(slots * slot_tokens), "--no-webui",
        "--alias", "bench",
    ]  # fmt: skip
    if threads:
        args += ["--threads", str(threads), "--threads-batch", str(threads)]
    return args


def start(
    llama: LlamaCpp, model_dir: Path, precision: str, port: int, slots: int, slot_tokens: int,
    threads: int | None, log_path: Path,
) -> ServerProcess:  # fmt: skip
    gguf = convert(llama, model_dir, precision)
    args = server_command(llama, gguf, port, slots, slot_tokens, threads)
    server = ServerProcess(args=args, log_path=log_path)
    server.start()
    return server
