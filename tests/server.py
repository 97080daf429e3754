"""A real genserve server in a subprocess on 127.0.0.1, for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: Path
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until(predicate, timeout: float = 60, every: float = 0.05):  # noqa: ANN001, ANN201
    """The predicate's first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def start_server(
    model: str | Path,
    log_dir: Path,
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> LiveServer:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "genserve.cli", "serve", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if "--data-dir" not in args:  # each server its own store, never the developer's var/
        cmd += ["--data-dir", str(log_dir / f"data-{port}")]
    if "--embedding-model" not in args:  # only the tests about embeddings pay for loading it
        cmd += ["--embedding-model", "none"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = LiveServer(proc, port, log_path, env)
    wait_healthy(server, timeout)
    return server


def wait_healthy(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            r = httpx.get(server.url + "/health", timeout=2)
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code == 200:
            return
        if r is not None and r.json().get("status") == "failed":
            server.stop()
            raise RuntimeError(f"server failed to load: {r.json().get('error')}")
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log()}")


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a server and its children: the engine runs in a process of its own."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total
