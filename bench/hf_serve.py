"""transformers' own server, `transformers serve --continuous-batching`, as a peer in
bench/throughput.py: the same weights (fp32), the same load, the same machine.

    python bench/throughput.py --precisions fp32,transformers-serve --samplings temp,top_p

It serves the model folder itself (its id in the API is the folder's path), with continuous
batching and paged attention on and its defaults otherwise, which is what its users get. It
takes no `ignore_eos` (an unknown field is a 422), so it serves a copy of the folder whose
generation config names no end-of-sequence token: every request then generates its
`max_tokens`, as on the other servers (the bench's random weights would end a few early).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import ServerProcess

NAME = "transformers-serve"
PEERS = {"fp32": NAME}  # genserve's precision -> this peer, on the same fp32 weights
UNKNOWN_FIELDS = ("ignore_eos",)  # what its request schema refuses


def no_eos_folder(model_dir: Path) -> Path:
    """A sibling of the model folder: links to its files, a generation config without EOS."""
    out = model_dir.parent / f"{model_dir.name}-noeos"
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        link = out / f.name
        if f.name != "generation_config.json" and not link.exists():
            link.symlink_to(f.resolve())
    gen = model_dir / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    (out / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    return out


def command(model_dir: Path, port: int, device: str) -> list[str]:
    cli = Path(sys.executable).parent / "transformers"
    return [
        str(cli), "serve", str(no_eos_folder(model_dir)), "--continuous-batching",
        "--device", device, "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def start(
    model_dir: Path, port: int, device: str, env: dict[str, str] | None, log_path: Path
) -> ServerProcess:
    server = ServerProcess(args=command(model_dir, port, device), log_path=log_path, env=env)
    server.start()
    return server
