"""Issue 20: SIGTERM to `genserve serve --ray --replicas 2` (its own local Ray) ends it cleanly
within 15 s, with the streams in flight finished. The signal goes to the whole process group,
as a terminal or a container init sends it. Measured before the fix: exit code 1 after 60 s,
"Failed to connect to GCS within 60 seconds" after "Deleting app" (the GCS had taken the signal
too); signalled alone, the driver already exited in 7 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server import LiveServer, free_port, wait_until

pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.timeout(420), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# The bound, under a platform's 30 s grace period. Measured here (2 busy cores) once
# fixed: 11-12 s, of which 3 s finishing the streams and 5-6 s ending the local Ray.
EXIT_WITHIN_S = 15.0
# In flight when the signal comes (it follows their second chunk), and short enough that
# finishing them is not most of the bound: 400 tokens took 7 s to finish on a 2-core AVX2
# EPYC under the suite, and the exit then came at 15.1 s (Ray's own shutdown: 5 s).
MAX_TOKENS = 160
STREAMS = 4


def start(model: Path, tmp: Path) -> LiveServer:
    port = free_port()
    cmd = [
        sys.executable, "-m", "genserve.cli", "serve", "--model", str(model), "--port", str(port),
        "--ray", "--replicas", "2", "--max-batch-size", "4", "--embedding-model", "none",
        "--data-dir", str(tmp / "data"),
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    log_path = tmp / "cli.log"
    with log_path.open("w") as log:
        # Its own process group, signalled whole below: as a terminal's Ctrl-C or a container's
        # init (tini -g) does, so Ray's own processes (GCS, raylet) get the signal too.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = LiveServer(proc, port, log_path, env)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"genserve serve --ray exited:\n{server.log()[-3000:]}")
        try:
            return httpx.get(server.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=300, every=0.5)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return server


def stream(url: str, out: list[str]) -> None:
    body = {"model": "tiny-llama", "prompt": "def f(x):", "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])


def test_sigterm_ends_a_local_ray_server_quickly_with_streams_finished(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start(tiny_model_dir, tmp_path)
    frames: list[list[str]] = [[] for _ in range(STREAMS)]
    clients = [threading.Thread(target=stream, args=(server.url, f)) for f in frames]
    for c in clients:
        c.start()
    wait_until(lambda: all(len(f) >= 2 for f in frames), timeout=60)  # all under way
    began = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    in_flight = [i for i, f in enumerate(frames) if "[DONE]" not in f]
    try:
        code = server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        raise
    took = time.monotonic() - began
    for c in clients:
        c.join(timeout=60)
    print(f"SIGTERM -> exit: {took:.1f}s, exit code {code}, in flight: {len(in_flight)}")
    assert code == 0, server.log()[-3000:]
    assert took < EXIT_WITHIN_S, f"{took:.1f}s to exit:\n{server.log()[-3000:]}"
    assert in_flight, "every stream ended before the signal: nothing was tested"
    for i in in_flight:  # each stream in flight at the signal ran to its end
        assert frames[i] and frames[i][-1] == "[DONE]", frames[i][-3:]
        chunks = [json.loads(f) for f in frames[i][:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
