"""`genserve serve --ray ...` started as an operator runs it, for the Ray integration tests:
its log in the test's folder, returned once Serve reports the app RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
