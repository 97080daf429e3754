"""One server per data dir (genserve/storage/lock.py): a second one waits for the first to exit
(a rolling restart), then takes the dir; or, past its wait, refuses to start and names the
holder. The lock dies with its process, however that ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genserve.config import ServerConfig, StorageConfig
from genserve.storage import lock

HOLDER = """
import sys, time
from pathlib import Path
from genserve.storage import lock
f = lock.hold(Path(sys.argv[1]), 0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(data_dir: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    proc = holder(tmp_path, 30)
    try:
        with pytest.raises(lock.DataDirBusy) as caught:
            lock.hold(tmp_path, 0.3)
        assert f"pid {proc.pid}" in str(caught.value) and "one server per --data-dir" in str(
            caught.value
        )
    finally:
        proc.kill()
        proc.wait()
    held = lock.hold(tmp_path, 0)  # a killed holder leaves nothing behind
    held.close()


def test_a_waiting_server_takes_the_dir_once_its_holder_exits(tmp_path: Path) -> None:
    proc = holder(tmp_path, 0.5)
    start = time.monotonic()
    held = lock.hold(tmp_path, 30)
    assert proc.wait() == 0 and time.monotonic() - start < 30
    assert (tmp_path / lock.LOCK_NAME).read_text().strip() == f"pid {os.getpid()}"
    held.close()


def test_serve_exits_when_its_data_dir_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from genserve import server

    monkeypatch.setattr(server, "DATA_DIR_WAIT_S", 0.2)
    proc = holder(tmp_path, 30)
    try:
        config = ServerConfig(storage=StorageConfig(data_dir=str(tmp_path)))
        with pytest.raises(SystemExit) as caught:
            server.serve(config)  # refuses before it loads anything
        assert caught.value.code == 1
        assert f"in use by another genserve (pid {proc.pid})" in caplog.text
        assert "waiting up to 0 s for it to exit" in caplog.text  # said while it waited
    finally:
        proc.kill()
        proc.wait()
