"""`genserve serve --ray ...` started as an operator runs it, for the Ray integration tests:
its log in the test's folder, returned once Serve reports the app RUNNING."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.server import LiveServer, wait_until


def start_ray_cli(
    port: int, args: list[str], tmp: Path, timeout: float, every: float
) -> LiveServer:
    from ray import serve

    cmd = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(port), "--ray", *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    log_path = tmp / "cli.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(proc, port, log_path, env)

    def deployed() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"genserve serve --ray exited:\n{server.log()[-3000:]}")
        app = serve.status().applications.get("genserve")
        return app is not None and app.status == "RUNNING"

    try:
        wait_until(deployed, timeout=timeout, every=every)
    except BaseException:
        server.stop()
        raise
    return server


def fine_tune(
    api: Any, model: str, suffix: str, examples: int, hyperparameters: dict, timeout: float,
    every: float,
) -> tuple[str, str]:  # fmt: skip
    """Upload `examples` chat rows, start a fine-tuning job on `model` and wait for it to end;
    (fine-tuned model id, job id), the job having succeeded."""
    rows = [
        {"messages": [{"role": "user", "content": f"{i} + {i}?"},
                      {"role": "assistant", "content": str(2 * i)}]}
        for i in range(examples)
    ]  # fmt: skip
    data = "\n".join(json.dumps(r) for r in rows).encode()
    file_id = api.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    job = api.fine_tuning.jobs.create(
        model=model, training_file=file_id, suffix=suffix, hyperparameters=hyperparameters
    )

    def finished() -> object:
        j = api.fine_tuning.jobs.retrieve(job.id)
        return j if j.status in ("succeeded", "failed", "cancelled") else None

    done = wait_until(finished, timeout=timeout, every=every)
    assert done.status == "succeeded", done.error
    return done.fine_tuned_model, job.id
