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
from collections.abc import Callable
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


class Signaller:
    """Sends SIGTERM from the client thread whose stream is the last to get its second chunk,
    the moment it does. Polling for that from the test's thread (every 50 ms) let a CI
    machine's loaded cores delay the signal until every 160-token stream (0.3-0.5 s on the
    tiny model) had ended, and nothing was in flight to test."""

    def __init__(self, pid: int) -> None:
        self.pid, self.lock, self.sent = pid, threading.Lock(), threading.Event()
        self.frames: list[list[str]] = [[] for _ in range(STREAMS)]
        self.under_way, self.began, self.in_flight = 0, 0.0, list[int]()

    def second_chunk(self) -> None:
        with self.lock:
            self.under_way += 1
            if self.under_way < STREAMS:
                return
            self.began = time.monotonic()
            os.killpg(self.pid, signal.SIGTERM)
            self.in_flight = [i for i, f in enumerate(self.frames) if "[DONE]" not in f]
            self.sent.set()


def stream(url: str, out: list[str], under_way: Callable[[], None]) -> None:
    body = {"model": "tiny-llama", "prompt": "def f(x):", "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                if len(out) == 2:
                    under_way()


def test_sigterm_ends_a_local_ray_server_quickly_with_streams_finished(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start(tiny_model_dir, tmp_path)
    sig = Signaller(server.proc.pid)
    args = [(server.url, f, sig.second_chunk) for f in sig.frames]
    clients = [threading.Thread(target=stream, args=a) for a in args]
    for c in clients:
        c.start()
    if not sig.sent.wait(timeout=60):  # all under way, and the signal sent
        os.killpg(server.proc.pid, signal.SIGKILL)
        raise AssertionError("the streams did not all start within 60 s")
    frames, began, in_flight = sig.frames, sig.began, sig.in_flight
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
    # The signalling stream had 2 of its 161 chunks, so it at least was in flight.
    for i in in_flight:  # each stream in flight at the signal ran to its end
        assert frames[i] and frames[i][-1] == "[DONE]", frames[i][-3:]
        chunks = [json.loads(f) for f in frames[i][:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
