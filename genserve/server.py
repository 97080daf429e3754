"""Serving: uvicorn around the app, with a SIGTERM that drains (genserve.cli serve runs this)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from genserve.config import ServerConfig
from genserve.engine.types import FailureKind, RequestFailure
from genserve.runtime import heap
from genserve.storage import lock

log = logging.getLogger(__name__)
# How long a new server waits for the one holding its data dir to exit (a rolling restart,
# where the old one drains its requests first) before it gives up.
DATA_DIR_WAIT_S = 30.0
CUT_GRACE_S = 2.0  # after the drain timeout, for cut requests to send their error and end
CUT = RequestFailure(
    "the server is shutting down and its drain timeout passed; retry", FailureKind.UNAVAILABLE
)


class DrainingServer:
    """uvicorn, with a SIGTERM that drains: new requests get 503 while running ones finish
    (up to --drain-timeout), then the process exits 0. A second signal exits at once."""

    def __init__(self, app, config: ServerConfig, log_level: str) -> None:  # noqa: ANN001
        import uvicorn

        from genserve.api.connections import guarded_protocol

        conn = config.connections
        uv = uvicorn.Config(
            app, host=config.host, port=config.port, log_level=log_level,
            access_log=False,  # genserve.access logs each request once, with its request id
            http=guarded_protocol(conn),  # header deadline and connection cap: see its module
            timeout_keep_alive=conn.keep_alive_s,  # type: ignore[arg-type] - used as a float
            h11_max_incomplete_event_size=conn.max_header_bytes,  # if h11 is the parser
            # Once the drain has run its course, what uvicorn still waits for (an upload, say)
            # is cancelled after this, and the lifespan's shutdown (engines, jobs) still runs:
            # without it uvicorn waited for every open connection, however long.
            timeout_graceful_shutdown=int(CUT_GRACE_S),
        )  # fmt: skip
        self.server = uvicorn.Server(uv)
        self.edge = app.state.edge
        self.runtime = app.state.runtime
        self.timeout_s = config.security.drain_timeout_s
        self._plain_exit = self.server.handle_exit
        self.server.handle_exit = self._on_signal

    def run(self) -> None:
        self.server.run()

    def _on_signal(self, sig, frame) -> None:  # noqa: ANN001
        if self.edge.draining:
            self._plain_exit(sig, frame)
            return
        self.edge.draining = True  # before the log line, which tests wait for
        log.info("signal %s: draining (%d in flight, up to %.0fs)", sig, self.edge.in_flight,
                 self.timeout_s)  # fmt: skip
        threading.Thread(target=self._drain, name="genserve-drain", daemon=True).start()

    def _drain(self) -> None:
        self._wait_idle(self.timeout_s)
        if self.edge.in_flight:
            log.warning("drain timeout: %d requests still running are cut", self.edge.in_flight)
            for served in list(self.runtime.models.values()):
                served.engine.cut(CUT)
            self._wait_idle(CUT_GRACE_S)  # their error events and [DONE] go out
        self.server.should_exit = True

    def _wait_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.edge.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)


def serve(config: ServerConfig, log_level: str = "info") -> None:
    try:  # before anything loads: a second server on one data dir would corrupt its jobs
        data_lock = lock.hold(Path(config.storage.data_dir), DATA_DIR_WAIT_S)
    except lock.DataDirBusy as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    loader = None
    if config.engine.own_process:  # first: it loads while this process imports the app
        from genserve.runtime.lifecycle import EarlyEngineLoader

        loader = EarlyEngineLoader(config)
    try:
        from genserve.api.app import create_app

        app = create_app(config, loader)
        warn_fd_limit(config.connections.max_connections)
        DrainingServer(app, config, log_level).run()
    finally:
        if loader is not None:
            loader.discard()
        data_lock.close()
    heap.before_exit()


def warn_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: a cap above the process's limit cannot hold."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + 128 > soft:
        log.warning(
            "--max-connections %d is close to the open-file limit (%d): raise `ulimit -n` or "
            "lower --max-connections", max_connections, soft,
        )  # fmt: skip
